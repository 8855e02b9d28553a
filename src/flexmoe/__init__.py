"""flexmoe: mixture-of-experts with one sharded expert layout and run-time adaptive plans."""

from flexmoe.core.config import MoEConfig, RoutingConfig
from flexmoe.core.dispatch import combine, dispatch
from flexmoe.core.plans import Plan, PlanRecord
from flexmoe.core.routing import RoutingPlan, route, routing_from_topk
from flexmoe.layer import MoELayer
from flexmoe.tuning.tuner import TunerConfig

__all__ = [
    "MoEConfig",
    "MoELayer",
    "Plan",
    "PlanRecord",
    "RoutingConfig",
    "RoutingPlan",
    "TunerConfig",
    "combine",
    "dispatch",
    "route",
    "routing_from_topk",
]
