"""MoELayer: gate -> route -> (dispatch -> experts -> combine, as the chosen plan's strategy).

Legend: T tokens (all leading dims of x flattened), M model dim, E experts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from flexmoe.comm import ExpertGroups, agree_max, check_agreement
from flexmoe.config import ALL_TO_ALL_ALGORITHMS, MoEConfig
from flexmoe.cost_fit import PlanRanker
from flexmoe.cost_model import ClusterSpec, CostModel, LayerShape, candidate_plans, default_cluster
from flexmoe.experts import Experts
from flexmoe.gates import build_gate
from flexmoe.layout import ExpertLayout
from flexmoe.plan_file import apply_plan_table
from flexmoe.plans import STATIC_DEFAULT, Plan, PlanRecord
from flexmoe.routing import RoutingPlan, route
from flexmoe.strategies import build_strategy
from flexmoe.trial_timer import time_step
from flexmoe.tuner import PlanTuner, TunerConfig


def _group_size_and_rank(group) -> tuple[int, int]:
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _shared_seed(seed: int | None, group, world_size: int) -> int:
    """The layer seed every rank uses; drawn from torch's RNG and broadcast from the first rank."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    if world_size > 1:
        box = [seed]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group or dist.group.WORLD, 0), group=group)
        seed = box[0]
    return seed


class MoELayer(nn.Module):
    """Sparsely-gated mixture-of-experts FFN with one sharded expert layout for every plan."""

    def __init__(
        self,
        model_dim: int,
        hidden_dim: int,
        num_experts: int,
        *,
        top_k: int = 2,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float | None = None,
        gate: str = "linear",
        gate_noise: float = 0.0,
        normalize_gate: bool = True,
        batch_prioritized_routing: bool = False,
        is_postscore: bool = True,
        aux_loss: str = "gshard",
        router_z_loss: float = 0.0,
        activation: str = "gelu",
        bias: bool = True,
        group=None,
        parallelism: int | str = "adaptive",
        pipeline_degree: int | str = "adaptive",
        all_to_all: str = "auto",
        local_world_size: int | None = None,
        tuner: TunerConfig | bool = True,
        cluster: ClusterSpec | None = None,
        plan_table=None,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        self.config = MoEConfig(
            model_dim=model_dim,
            hidden_dim=hidden_dim,
            num_experts=num_experts,
            top_k=top_k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            gate=gate,
            gate_noise=gate_noise,
            normalize_gate=normalize_gate,
            batch_prioritized_routing=batch_prioritized_routing,
            is_postscore=is_postscore,
            aux_loss=aux_loss,
            router_z_loss=router_z_loss,
            activation=activation,
            bias=bias,
            parallelism=parallelism,
            pipeline_degree=pipeline_degree,
            all_to_all=all_to_all,
            local_world_size=local_world_size,
        )
        world_size, rank = _group_size_and_rank(group)
        self.group = group
        self.layout = ExpertLayout(
            num_experts=num_experts,
            model_dim=model_dim,
            hidden_dim=hidden_dim,
            world_size=world_size,
            rank=rank,
            activation=activation,
        )
        self._check_fixed_settings()
        self.groups = ExpertGroups(
            group,
            shards_per_expert=self.layout.shards_per_expert,
            # ranks per node: set explicitly, or the topology torchrun reports
            local_world_size=local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or None,
        )
        self.seed = _shared_seed(seed, group, world_size)
        gate_generator = torch.Generator().manual_seed(self.seed)
        self.gate = build_gate(gate, model_dim, num_experts, generator=gate_generator, device=device)
        self.experts = Experts(self.layout, seed=self.seed, bias=bias, dtype=dtype, device=device)
        self._strategies: dict[Plan, object] = {}
        # the run-time tuner (True: default settings); False keeps "adaptive" on the static default plan
        if tuner is True:
            tuner = TunerConfig()
        self.tuner = self._build_tuner(tuner, cluster, device) if tuner else None
        if plan_table is not None:  # a plan file (path or dict) or a tuner state_dict: skip known buckets
            if self.tuner is None:
                raise ValueError("plan_table needs the run-time tuner, but tuner=False was given")
            apply_plan_table(self, plan_table, strict=True)
        self.aux_loss = torch.zeros((), device=device)
        self.last_plan: PlanRecord | None = None
        self.last_routing: RoutingPlan | None = None
        self._trial_timer = None  # times a tuner trial through this step's backward

    # -- plans -------------------------------------------------------------------------------------
    def _check_fixed_settings(self) -> None:
        c = self.config
        if c.parallelism != "adaptive" and c.parallelism not in self.layout.valid_degrees:
            raise ValueError(
                f"parallelism must be 'adaptive' or one of {self.layout.valid_degrees} for "
                f"E={c.num_experts} on {self.layout.world_size} ranks, got {c.parallelism}"
            )

    @property
    def adaptive(self) -> bool:
        c = self.config
        return "adaptive" in (c.parallelism, c.pipeline_degree) or c.all_to_all == "auto"

    def _build_tuner(self, config: TunerConfig, cluster: ClusterSpec | None, device) -> PlanTuner:
        c, L = self.config, self.layout
        shape = dict(
            model_dim=c.model_dim,
            hidden_dim=c.hidden_dim,
            num_experts=c.num_experts,
            world_size=L.world_size,
            top_k=c.top_k,
            swiglu=c.activation == "swiglu",
            bytes_per_element=self.experts.fc1_weight.element_size(),
        )
        plans = (
            [STATIC_DEFAULT]
            if L.world_size == 1
            else candidate_plans(
                LayerShape(capacity=1, tokens=1, **shape),
                two_dh=self.groups.supports_2dh,
                degrees=config.pipeline_degrees,
            )
        )
        plans = [  # settings that are fixed stay fixed
            p
            for p in plans
            if c.parallelism in ("adaptive", p.r)
            and (p.r == 0 or c.pipeline_degree in ("adaptive", p.d))
            and (p.r == 0 or c.all_to_all in ("auto", p.all_to_all))
        ] or [self._fixed_plan()]
        model = CostModel(cluster or default_cluster(device))
        ranker = PlanRanker(model, plans, shape=shape, capacity_factor=c.capacity_factor)
        return PlanTuner(plans, ranker, config=config, group=self.group)

    def _fixed_plan(self) -> Plan:
        c = self.config
        return Plan(
            r=STATIC_DEFAULT.r if c.parallelism == "adaptive" else c.parallelism,
            d=STATIC_DEFAULT.d if c.pipeline_degree == "adaptive" else c.pipeline_degree,
            all_to_all=STATIC_DEFAULT.all_to_all if c.all_to_all == "auto" else c.all_to_all,
        )

    def _plan_before_routing(self, forced: Plan | None) -> tuple[Plan | None, str]:
        """A forced or fixed plan is known before routing; the tuner's needs the capacity."""
        if forced is not None:
            if not isinstance(forced, Plan):
                raise ValueError(f"plan must be a flexmoe.Plan, got {type(forced).__name__}")
            if forced.r not in self.layout.valid_degrees:
                raise ValueError(f"plan.r must be one of {self.layout.valid_degrees}, got {forced.r}")
            return forced, "forced"
        if not self.adaptive:
            return self._fixed_plan(), "fixed"
        if self.tuner is None:
            return self._fixed_plan(), "static-default"
        return None, "tuner"

    def _strategy(self, plan: Plan):
        if self.layout.world_size == 1:
            plan = STATIC_DEFAULT  # one process: every plan is the same local computation
        if plan.all_to_all == "2dh" and not self.groups.supports_2dh:
            raise ValueError(
                "all_to_all='2dh' needs local_world_size L with 1 < L < W and W % L == 0 "
                f"(W={self.layout.world_size}, L={self.groups.local_world_size}); use 'flat'"
            )
        if plan not in self._strategies:
            self._strategies[plan] = build_strategy(plan, self.experts, self.groups)
        return plan, self._strategies[plan]

    def _agree_capacity(self, plan: Plan | None, device) -> Callable[[int], int] | None:
        """Ranks must run the same plan on the same shapes, or the collectives would hang: check it,
        and take the group's largest capacity, before any token moves."""
        if self.layout.world_size == 1:
            return None
        checks = {
            "model_dim": self.config.model_dim,
            "training": int(self.training),
            "adaptive": int(plan is None),
        }
        if plan is not None:
            checks.update(
                {
                    "plan.r": plan.r,
                    "plan.d": plan.d,
                    "plan.all_to_all": ALL_TO_ALL_ALGORITHMS.index(plan.all_to_all),
                }
            )

        def agree(capacity: int) -> int:
            check_agreement(checks, self.group, device=device)
            return agree_max([capacity], self.group, device=device)[0]

        return agree

    # -- forward -----------------------------------------------------------------------------------
    def _validate(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating point tensor, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.config.model_dim:
            raise ValueError(
                f"x must have last dimension model_dim={self.config.model_dim}, got shape {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor, plan: Plan | None = None) -> torch.Tensor:
        self._validate(x)
        plan, source = self._plan_before_routing(plan)
        x_TM = x.reshape(-1, self.config.model_dim)
        if self._trial_timer is not None:  # the previous timed step never finished its backward
            self._trial_timer.cancel()
            self._trial_timer = None
        clock = self.tuner.clock if self.tuner is not None else time.perf_counter
        started, trial = clock(), None
        logits_TE = self.gate(x_TM)
        routing = route(
            logits_TE,
            self.config.routing(training=self.training),
            training=self.training,
            agree_capacity=self._agree_capacity(plan, x.device),
        )
        if plan is None:
            plan, source = self.tuner.choose(routing.capacity, training=self.training, device=x.device)
            trial = self.tuner.last_trial
        plan, strategy = self._strategy(plan)
        routing = routing.padded_to(strategy.capacity_multiple)
        y_TM = strategy(
            x_TM.to(self.experts.fc1_weight.dtype), routing, is_postscore=self.config.is_postscore
        )
        if trial is not None:
            self._trial_timer = time_step(
                self.tuner, trial, forward_s=clock() - started, x=x_TM, y=y_TM, params=self.parameters()
            )
        self.aux_loss = routing.aux_loss
        self.last_routing = routing
        self.last_plan = PlanRecord(
            r=plan.r, d=plan.d, all_to_all=plan.all_to_all, capacity=routing.capacity, source=source
        )
        return y_TM.to(x.dtype).view(x.shape)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"model_dim={c.model_dim}, hidden_dim={c.hidden_dim}, num_experts={c.num_experts}, "
            f"top_k={c.top_k}, world_size={self.layout.world_size}"
        )
