"""MoELayer: gate -> route -> (dispatch -> experts -> combine, as the chosen plan's strategy).

Legend: T tokens (all leading dims of x flattened), M model dim, E experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from flexmoe.config import MoEConfig
from flexmoe.experts import Experts
from flexmoe.gates import build_gate
from flexmoe.layout import ExpertLayout
from flexmoe.plans import STATIC_DEFAULT, Plan, PlanRecord
from flexmoe.routing import route
from flexmoe.strategies import LocalStrategy


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
        self.seed = _shared_seed(seed, group, world_size)
        gate_generator = torch.Generator().manual_seed(self.seed)
        self.gate = build_gate(gate, model_dim, num_experts, generator=gate_generator, device=device)
        self.experts = Experts(self.layout, seed=self.seed, bias=bias, dtype=dtype, device=device)
        self._strategies: dict[Plan, object] = {}
        self.aux_loss = torch.zeros((), device=device)
        self.last_plan: PlanRecord | None = None

    # -- plans -------------------------------------------------------------------------------------
    def _check_fixed_settings(self) -> None:
        c = self.config
        if c.parallelism != "adaptive" and c.parallelism not in self.layout.valid_degrees:
            raise ValueError(
                f"parallelism must be 'adaptive' or one of {self.layout.valid_degrees} for "
                f"E={c.num_experts} on {self.layout.world_size} ranks, got {c.parallelism}"
            )

    def _choose_plan(self, forced: Plan | None) -> tuple[Plan, str]:
        if forced is not None:
            if not isinstance(forced, Plan):
                raise ValueError(f"plan must be a flexmoe.Plan, got {type(forced).__name__}")
            if forced.r not in self.layout.valid_degrees:
                raise ValueError(f"plan.r must be one of {self.layout.valid_degrees}, got {forced.r}")
            return forced, "forced"
        c = self.config
        adaptive = "adaptive" in (c.parallelism, c.pipeline_degree) or c.all_to_all == "auto"
        plan = Plan(
            r=STATIC_DEFAULT.r if c.parallelism == "adaptive" else c.parallelism,
            d=STATIC_DEFAULT.d if c.pipeline_degree == "adaptive" else c.pipeline_degree,
            all_to_all=STATIC_DEFAULT.all_to_all if c.all_to_all == "auto" else c.all_to_all,
        )
        return plan, "static-default" if adaptive else "fixed"

    def _strategy(self, plan: Plan):
        if self.layout.world_size == 1:
            plan = STATIC_DEFAULT  # one process: every plan is the same local computation
        if plan not in self._strategies:
            self._strategies[plan] = LocalStrategy(self.experts)
        return plan, self._strategies[plan]

    # -- forward -----------------------------------------------------------------------------------
    def _validate(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating point tensor, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.config.model_dim:
            raise ValueError(f"x must have last dimension model_dim={self.config.model_dim}, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, plan: Plan | None = None) -> torch.Tensor:
        self._validate(x)
        requested, source = self._choose_plan(plan)
        plan, strategy = self._strategy(requested)
        x_TM = x.reshape(-1, self.config.model_dim)
        compute_dtype = self.experts.fc1_weight.dtype
        logits_TE = self.gate(x_TM)
        routing = route(
            logits_TE,
            self.config.routing(training=self.training),
            training=self.training,
            capacity_multiple=strategy.capacity_multiple,
        )
        y_TM = strategy(x_TM.to(compute_dtype), routing, is_postscore=self.config.is_postscore)
        self.aux_loss = routing.aux_loss
        self.last_routing = routing
        self.last_plan = PlanRecord(
            r=plan.r, d=plan.d, all_to_all=plan.all_to_all, capacity=routing.capacity, source=source
        )
        return y_TM.to(x.dtype).view(x.shape)

    def extra_repr(self) -> str:
        c = self.config
        return f"model_dim={c.model_dim}, hidden_dim={c.hidden_dim}, num_experts={c.num_experts}, top_k={c.top_k}"
