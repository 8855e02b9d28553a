"""MoELayer: gate -> route -> (dispatch -> experts -> combine, as the chosen plan's strategy).

Legend: T tokens (all leading dims of x flattened), M model dim, E experts.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import struct
import time
import zlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

from flexmoe.core.config import (
    ALL_TO_ALL_ALGORITHMS,
    FLOAT_DTYPES,
    MoEConfig,
    check_dtype,
)
from flexmoe.core.experts import Experts
from flexmoe.core.gates import build_gate
from flexmoe.core.layout import ExpertLayout
from flexmoe.core.plans import STATIC_DEFAULT, Plan, PlanRecord
from flexmoe.core.routing import ExpertChoices, RoutingPlan, assign_slots, choices_from_topk, choose_experts
from flexmoe.core.shared_experts import SharedExperts
from flexmoe.ops.amp import autocast_disabled, expert_autocast_dtype
from flexmoe.parallel import agreement
from flexmoe.parallel.comm import ExpertGroups, FinishedWork, WeakGroup, group_size_and_rank
from flexmoe.parallel.strategies import build_strategy
from flexmoe.tuning.cost_model import (
    ClusterSpec,
    CostModel,
    LayerShape,
    candidate_plans,
    default_cluster,
    with_node_size,
)
from flexmoe.tuning.plan_table import apply_plan_table
from flexmoe.tuning.ranker import PlanRanker
from flexmoe.tuning.replay import Decision, Decisions
from flexmoe.tuning.trial_timer import time_step
from flexmoe.tuning.tuner import PlanTuner, TunerConfig


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
    """Sparsely-gated mixture-of-experts FFN with one sharded expert layout for every plan.

    Under torch.autocast the experts run in, and the output has, the autocast dtype (flexmoe.ops.amp)."""

    def __init__(
        self,
        *dims: int,
        config: MoEConfig | None = None,
        group=None,
        tuner: TunerConfig | bool = True,
        cluster: ClusterSpec | None = None,
        plan_table=None,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        device=None,
        build_experts: Callable[[ExpertLayout], nn.Module] | None = None,
        **settings,
    ):
        """`MoELayer(model_dim, hidden_dim, num_experts, **settings)`, any MoEConfig field a keyword,
        or `MoELayer(config=MoEConfig(...))`. The rest says where and how it runs: the process group
        (None: WORLD when initialised), the tuner, the cluster its cost model prices, a plan table to
        start from, the seed of its parameters (None: drawn, the same on every rank), dtype, device.
        `build_experts(layout)`: the experts module over this layer's layout (core.experts.Experts'
        interface) instead of drawing experts here, e.g. over parameters another model holds."""
        super().__init__()
        if config is None:
            config = MoEConfig.from_arguments(dims, settings)
        elif not isinstance(config, MoEConfig):
            raise ValueError(f"config must be a flexmoe.MoEConfig, got {type(config).__name__}")
        elif dims or settings:
            raise ValueError("give the settings either as config= or as arguments, not both")
        self.config = c = config
        check_dtype(dtype)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be None or an int, got {seed!r}")
        if not isinstance(tuner, TunerConfig | bool):
            raise ValueError(f"tuner must be True, False or a flexmoe.TunerConfig, got {tuner!r}")
        world_size, rank = group_size_and_rank(group)
        self._group = WeakGroup(group)  # held weakly: a layer must not outlive destroy_process_group's
        # ranks per node: set explicitly, or the topology torchrun reports
        local_world_size = c.local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or None
        finished = FinishedWork()  # the layer's finished collectives (see FinishedWork)
        # before anything that depends on the settings runs a collective (subgroups, the seed)
        self._check_ranks_agree(world_size, dtype, local_world_size, (tuner, cluster), finished)
        self.layout = ExpertLayout(
            num_experts=c.num_experts,
            model_dim=c.model_dim,
            hidden_dim=c.hidden_dim,
            world_size=world_size,
            rank=rank,
            activation=c.activation,
        )
        self._check_fixed_settings()
        self.groups = ExpertGroups(
            group,
            shards_per_expert=self.layout.shards_per_expert,
            local_world_size=local_world_size,
            finished=finished,
        )
        self._check_all_to_all()
        self.seed = _shared_seed(seed, group, world_size)
        gate_generator = torch.Generator().manual_seed(self.seed)
        # gate=None: no router of its own; every forward gets its routing from outside
        self.gate = (
            None
            if c.gate is None
            else build_gate(c.gate, c.model_dim, c.num_experts, generator=gate_generator, device=device)
        )
        if build_experts is None:
            self.experts = Experts(self.layout, seed=self.seed, bias=c.bias, dtype=dtype, device=device)
        else:  # nothing drawn: a model that brings its experts does not pay for a throwaway set
            self.experts = build_experts(self.layout)
        self.shared_experts = None
        if c.shared_hidden_dim:  # drawn after the gate from the same shared stream: identical on every rank
            self.shared_experts = SharedExperts(
                c.model_dim,
                c.shared_hidden_dim,
                activation=c.activation,
                bias=c.bias,
                gated=c.shared_expert_gate,
                generator=gate_generator,
                dtype=dtype,
                device=device,
            )
        if c.expert_bias_update_rate > 0:
            # selection bias (replicated: every rank applies the same update from the group's summed
            # load) and the load counted by training forwards since the last update
            self.register_buffer("expert_bias", torch.zeros(c.num_experts, device=device))
            self.register_buffer("expert_load", torch.zeros(c.num_experts, device=device), persistent=False)
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
        self._decisions = Decisions()  # what forwards with a graph decided, for their recomputation

    @property
    def group(self):
        """The process group given at construction (None: WORLD when initialised, else one process)."""
        return self._group()

    # -- copies and pickles ------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """copy.deepcopy (EMA, AveragedModel) and torch.save/pickle take the parameters and settings,
        not what the last forward left behind: graph-attached tensors cannot be copied, and the
        strategies are rebuilt on demand. Process groups are shared by a copy (WeakGroup)."""
        state = self.__dict__.copy()
        state["_strategies"] = {}
        state["last_routing"] = None
        state["aux_loss"] = self.aux_loss.detach()
        state["_trial_timer"] = None  # hook handles of a step in flight
        state["_decisions"] = Decisions()  # of graphs in flight
        return state

    # -- plans -------------------------------------------------------------------------------------
    def _check_fixed_settings(self) -> None:
        c = self.config
        if c.parallelism != "adaptive" and c.parallelism not in self.layout.valid_degrees:
            raise ValueError(
                f"parallelism must be 'adaptive' or one of {self.layout.valid_degrees} for "
                f"E={c.num_experts} on {self.layout.world_size} ranks, got {c.parallelism}"
            )

    def _check_all_to_all(self) -> None:
        """A fixed exchange that cannot run is refused now, as a forced Plan with it is, rather than
        silently running another (one process runs every plan locally, so it accepts any)."""
        if self.layout.world_size > 1 and self.config.all_to_all != "auto":
            self._check_exchange(self.config.all_to_all)

    def _check_exchange(self, algorithm: str) -> None:
        W = self.layout.world_size
        if algorithm == "2dh" and not self.groups.supports_2dh:
            raise ValueError(
                "all_to_all='2dh' needs local_world_size L with 1 < L < W and W % L == 0 "
                f"(W={W}, L={self.groups.local_world_size}); use 'flat'"
            )
        if algorithm == "dedup" and self.layout.shards_per_expert > 1:
            raise ValueError(
                f"all_to_all='dedup' sends tokens to whole experts: it needs num_experts >= W "
                f"(E={self.config.num_experts}, W={W}); use 'flat'"
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
            bytes_per_element=self.experts.fc1_weight.element_size(),  # updated by every forward
            master_bytes_per_element=self.experts.fc1_weight.element_size(),
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
        model = CostModel(with_node_size(cluster or default_cluster(device), self.groups.node_size))
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
        if self.layout.world_size == 1:  # every plan is the same local computation: nothing to tune
            return STATIC_DEFAULT, "local"
        if self.tuner is None:
            return self._fixed_plan(), "static-default"
        return None, "tuner"

    def _strategy(self, plan: Plan):
        """(the plan to record, the strategy that runs it). One process: every plan is the same local
        computation, which runs as the static default, but last_plan records the plan asked for."""
        run = STATIC_DEFAULT if self.layout.world_size == 1 else plan
        self._check_exchange(run.all_to_all)
        if run not in self._strategies:
            self._strategies[run] = build_strategy(run, self.experts, self.groups)
        return plan, self._strategies[run]

    def _layer_fields(self, dtype, local_world_size, tuning: tuple) -> list[agreement.Field]:
        """Every setting that must be equal on all ranks of the group, as fixed-size codes: each field
        of the config (with the ranks per node in effect), the parameter dtype and the tuner's."""
        config = dataclasses.replace(self.config, local_world_size=local_world_size)
        return [
            *agreement.config_fields(config),
            agreement.choice_field("dtype", dtype or torch.get_default_dtype(), FLOAT_DTYPES),
            # the tuner's settings and cluster decide which candidates every rank walks, in lockstep
            agreement.Field("tuner and cluster settings (fingerprint)", _fingerprint(repr(tuning)), hex),
        ]

    def _check_ranks_agree(
        self, world_size: int, dtype, local_world_size, tuning: tuple, finished: FinishedWork
    ) -> None:
        """Once per layer: all ranks built it with the same shapes and settings (ValueError naming
        every rank's value otherwise). A fingerprint of them is re-checked at every step."""
        tuner, cluster = tuning
        tuning = (TunerConfig() if tuner is True else tuner, cluster)
        fields = self._layer_fields(dtype, local_world_size, tuning)
        self._fingerprint = _fingerprint(struct.pack(f"<{len(fields)}q", *(f.code for f in fields)))
        if world_size > 1:
            # on the backend's own device (CPU for gloo, the current GPU for NCCL)
            what = "MoELayer construction"
            agreement.agree_fields(fields, group=self.group, what=what, finished=finished)

    def _agree_capacity(
        self, plan: Plan | None, capacity: int, assignments: int, compute_dtype, device
    ) -> tuple[int, int]:
        """Ranks must run the same plan on the same shapes, or the collectives would hang or abort:
        check it, and take the group's largest capacity and number of assignments (token-expert
        pairs: what the exchange carries), before any token moves. One fixed-size collective whatever
        the plan (a forced and an adaptive step send the same vector)."""
        if self.layout.world_size == 1:
            return capacity, assignments
        f = agreement
        fields = [
            f.Field("layer settings (fingerprint)", self._fingerprint),
            # the experts' dtype this step (autocast's or the parameters'): what the collectives carry
            f.choice_field("compute dtype", compute_dtype, FLOAT_DTYPES),
            f.choice_field("training", self.training, (False, True)),
            f.int_field("plan.r", None if plan is None else plan.r, unset="adaptive"),
            f.int_field("plan.d", None if plan is None else plan.d, unset="adaptive"),
            f.choice_field(
                "plan.all_to_all",
                "adaptive" if plan is None else plan.all_to_all,
                ("adaptive", *ALL_TO_ALL_ALGORITHMS),
            ),
        ]
        what, finished = "MoELayer forward", self.groups.finished
        maxima = f.agree_fields(
            fields, [capacity, assignments], self.group, device=device, what=what, finished=finished
        )
        return maxima[0], maxima[1]

    def _tuning_capacity(self, capacity: int, assignments: int) -> int:
        """What the tuner keys and ranks plans on: the capacity, or, when it is larger, the mean load
        per expert of the busiest rank. The flat exchange carries only the rows that hold a token
        (parallel.chunks), so under dropless routing, whose capacity is the fullest expert's queue and
        moves from step to step with the routing's skew, the plans' costs follow the load instead."""
        return min(capacity, -(-assignments // self.config.num_experts))

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

    def _choose_experts(
        self, x_TM: torch.Tensor, top_k_index, top_k_weights, *, count_load: bool = True
    ) -> ExpertChoices:
        """The layer's own gate, or routing given from outside (any router's top-k choices).
        `count_load`: add the tokens to the expert load (not again when a forward is recomputed)."""
        if top_k_index is None and top_k_weights is None:
            if self.gate is None:
                raise ValueError("this layer has no gate (gate=None): pass top_k_index and top_k_weights")
            bias_E = getattr(self, "expert_bias", None)
            config = self.config.routing(training=self.training)
            choices = choose_experts(self.gate(x_TM), config, training=self.training, selection_bias_E=bias_E)
            if bias_E is not None and self.training and count_load:
                self.expert_load += choices.demand_E.to(self.expert_load.dtype)
            return choices
        if top_k_index is None or top_k_weights is None:
            raise ValueError("top_k_index and top_k_weights must be given together")
        T = x_TM.shape[0]
        if top_k_index.dim() != 2 or top_k_index.shape[0] != T:
            raise ValueError(
                f"top_k_index must be [T, k] with T={T} tokens of x, got shape {tuple(top_k_index.shape)}"
            )
        return choices_from_topk(top_k_index, top_k_weights, self.config.num_experts)

    # torch.compile runs the layer as it runs eagerly: one graph break per MoE layer, the block's other
    # work compiled around it. Tracing into it gains nothing and costs much: its host-side work (the
    # capacity agreement, the tuner, the collectives, data-dependent sizes) breaks the graph about 30
    # times, and its GEMMs run as the same library calls compiled or not.
    @torch.compiler.disable
    def forward(
        self,
        x: torch.Tensor,
        plan: Plan | None = None,
        *,
        top_k_index: torch.Tensor | None = None,
        top_k_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """y = MoE(x). With `top_k_index`/`top_k_weights` ([T, k] over the flattened tokens of x) the
        routing comes from outside and the layer's gate is not used; the layer's capacity factor
        still applies (0: dropless). Under activation checkpointing (torch.utils.checkpoint,
        use_reentrant=False) the recomputed forward replays the first one's plan and capacity, and is
        not a step: the tuner neither counts nor times it (flexmoe.tuning.replay)."""
        self._validate(x)
        replayed = self._decisions.replayed()  # a recomputation: the first run's decision
        if replayed is None:
            plan, source = self._plan_before_routing(plan)
            if self._trial_timer is not None:  # the previous timed step never finished its backward
                self._trial_timer.cancel()
                self._trial_timer = None
        x_TM = x.reshape(-1, self.config.model_dim)
        # Under autocast the experts (GEMMs, all-to-all, weight gathers) run in autocast's dtype and the
        # layer returns it, as nn.Linear does; the gate and routing stay fp32 (DESIGN sections 2, 11).
        # The casts are explicit and the rest runs with autocast off, so it computes exactly what an
        # explicitly cast low-precision layer computes.
        device_type = x.device.type
        low_dtype = expert_autocast_dtype(self.experts.fc1_weight.dtype, device_type)
        compute_dtype = low_dtype or self.experts.fc1_weight.dtype
        out_dtype = low_dtype or x.dtype
        if self.tuner is not None and replayed is None:  # the collectives carry the compute dtype
            self.tuner.rank_plans.set_bytes_per_element(compute_dtype.itemsize)
        clock = self.tuner.clock if self.tuner is not None else time.perf_counter
        started, trial = clock(), None
        capacity_factor = self.config.routing(training=self.training).capacity_factor
        # the named stages show up in torch.profiler traces (bench dist's breakdown reads them)
        with autocast_disabled(device_type):
            with record_function("flexmoe.route"):  # each token's experts and its place in their queues
                choices = self._choose_experts(x_TM, top_k_index, top_k_weights, count_load=replayed is None)
            with record_function("flexmoe.agree"):  # the group's capacity; every rank runs the same step
                if replayed is not None:  # agreed by the first run; every rank replays alike
                    capacity = replayed.capacity
                else:
                    capacity, assignments = self._agree_capacity(
                        plan,
                        choices.capacity(capacity_factor),
                        choices.experts_TK.numel(),
                        compute_dtype,
                        x.device,
                    )
            with record_function("flexmoe.choose_plan"):  # forced or fixed already known, else the tuner's
                if replayed is not None:
                    plan, source = replayed.plan, replayed.source
                elif plan is None:
                    plan, source = self.tuner.choose(
                        self._tuning_capacity(capacity, assignments), training=self.training, device=x.device
                    )
                    trial = self.tuner.last_trial
                plan, strategy = self._strategy(plan)
            with record_function("flexmoe.run_plan"):  # slots -> dispatch -> experts -> combine
                routing = assign_slots(choices, capacity, capacity_multiple=strategy.capacity_multiple)
                y_TM = self._run_strategy(strategy, x_TM.to(compute_dtype), routing, compute_dtype)
        if replayed is not None:  # the layer keeps what the first run left
            return y_TM.to(out_dtype).view(x.shape)
        self._decisions.remember(Decision(plan, source, capacity), y_TM)
        if trial is not None:
            self._trial_timer = time_step(
                self.tuner, trial, forward_s=clock() - started, x=x_TM, y=y_TM, params=self.parameters()
            )
        self.aux_loss = routing.aux_loss
        self.last_routing = _detached(routing)  # for inspection; must not keep the graph alive
        self.last_plan = PlanRecord(
            r=plan.r, d=plan.d, all_to_all=plan.all_to_all, capacity=routing.capacity, source=source
        )
        return y_TM.to(out_dtype).view(x.shape)

    def _run_strategy(self, strategy, x_TM: torch.Tensor, routing: RoutingPlan, dtype) -> torch.Tensor:
        # the shared experts run beside the routed ones: overlapped with the all-to-all where there is one
        shared = None if self.shared_experts is None else functools.partial(self.shared_experts, x_TM)
        y_TM, shared_TM = strategy(
            x_TM, routing, is_postscore=self.config.is_postscore, dtype=dtype, beside=shared
        )
        return y_TM if shared_TM is None else y_TM + shared_TM

    @torch.no_grad()
    def update_expert_bias(self) -> torch.Tensor:
        """Aux-loss-free balancing step (DeepSeek-V3): bias_e += rate * sign(mean load - load_e) over
        the load of the group's training forwards since the last call; call it once per optimizer
        step on every rank. Returns the load it used ([E], summed over the group)."""
        if not hasattr(self, "expert_bias"):
            raise ValueError("update_expert_bias needs expert_bias_update_rate > 0 at construction")
        load_E = self.expert_load.clone()
        if self.layout.world_size > 1:
            work = dist.all_reduce(load_E, group=self.group, async_op=True)
            self.groups.finished.wait(work, load_E)  # often a step's last collective: see FinishedWork
        self.expert_bias += self.config.expert_bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.expert_load.zero_()
        return load_E

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"model_dim={c.model_dim}, hidden_dim={c.hidden_dim}, num_experts={c.num_experts}, "
            f"top_k={c.top_k}, world_size={self.layout.world_size}"
        )


def _detached(routing: RoutingPlan) -> RoutingPlan:
    return dataclasses.replace(
        routing,
        weights_TK=routing.weights_TK.detach(),
        weight_N=routing.weight_N.detach(),
        aux_loss=routing.aux_loss.detach(),
    )


def _fingerprint(data: str | bytes) -> int:
    """A checksum that is the same in every process (unlike hash() of a str)."""
    return zlib.crc32(data.encode() if isinstance(data, str) else data)
