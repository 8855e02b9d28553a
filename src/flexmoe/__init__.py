"""flexmoe: mixture-of-experts with one sharded expert layout and run-time adaptive plans."""

from flexmoe.config import MoEConfig, RoutingConfig
from flexmoe.dispatch import combine, dispatch
from flexmoe.layer import MoELayer
from flexmoe.plans import Plan, PlanRecord
from flexmoe.routing import RoutingPlan, route, routing_from_topk

__all__ = [
    "MoEConfig",
    "MoELayer",
    "Plan",
    "PlanRecord",
    "RoutingConfig",
    "RoutingPlan",
    "combine",
    "dispatch",
    "route",
    "routing_from_topk",
]
