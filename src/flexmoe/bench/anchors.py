"""flexmoe against DeepSpeed-MoE on several ranks, with the distributed floor (`flexmoe bench dist`).

For each workload (T tokens per rank, E experts over the W ranks), in interleaved rounds, each step the
forward and backward of mean(y^2) + 0.01 aux on input that requires a gradient (as inside a model),
the slowest rank's time:
- adaptive: flexmoe's tuner exploring from a cold start; its first `adaptive_warmup` steps are not
  timed (the steady state the tuner reaches within them is);
- every static plan of flexmoe (each r, d in {1, 2, 4}, flat all-to-all);
- deepspeed: DeepSpeed-MoE (bench/deepspeed_moe.py), when installed;
- floor: what no expert-parallel implementation avoids: the expert GEMMs this rank multiplies under
  r = 1 (exactly the rows it receives) plus the four all-to-alls of the [E, C, M] buffer (forward and
  backward, there and back), each timed alone on this group; no overlap is assumed.
Ratios to DeepSpeed are paired: the median over rounds of the two steps' times in the same round.
Beside the times: host synchronisations in one forward of each flexmoe variant (bench/host_syncs.py),
and where a step of the adaptive layer's plan spends its time (torch.profiler, the layer's named
stages and its backward nodes, this rank).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.profiler import profile

from flexmoe import MoELayer
from flexmoe.bench import deepspeed_moe
from flexmoe.bench.common import gemm_floor_steps, paired_ratio
from flexmoe.bench.host_syncs import count_host_syncs
from flexmoe.cpu_memory import release_freed_memory
from flexmoe.parallel.comm import max_over_ranks


@dataclass(frozen=True, kw_only=True)
class AnchorWorkload:
    name: str
    model_dim: int
    hidden_dim: int
    num_experts: int
    top_k: int
    tokens: int  # per rank
    capacity_factor: float = 1.0


# today's MoEs: many small experts with top-8 (Qwen3, DeepSeek-V3, OLMoE), and the older shapes
ANCHOR_WORKLOADS = (
    AnchorWorkload(name="fine-grained", model_dim=512, hidden_dim=256, num_experts=64, top_k=8, tokens=2048),
    AnchorWorkload(
        name="finer-grained", model_dim=512, hidden_dim=128, num_experts=128, top_k=8, tokens=2048
    ),
    AnchorWorkload(name="large experts", model_dim=512, hidden_dim=2048, num_experts=8, top_k=2, tokens=4096),
    AnchorWorkload(name="small experts", model_dim=128, hidden_dim=256, num_experts=8, top_k=2, tokens=4096),
)
QUICK_ANCHORS = (
    AnchorWorkload(name="tiny fine-grained", model_dim=32, hidden_dim=16, num_experts=8, top_k=4, tokens=64),
)
STATIC_DEPTHS = (1, 2, 4)
FLEXMOE_ROW = "adaptive"
ANCHOR_COLUMNS = (
    "workload",
    "W",
    "variant",
    "ms",
    "vs_deepspeed",
    "vs_floor",
    "host_syncs",
    "plan",
)


@dataclass(frozen=True, kw_only=True)
class AnchorSettings:
    adaptive_warmup: int = 40  # cold-start steps of the adaptive layer before its steps are timed
    warmup: int = 2  # untimed steps of every other variant
    rounds: int = 8
    profile_steps: int = 3


def _training_step(module: torch.nn.Module, x: torch.Tensor, forward: Callable) -> Callable[[], None]:
    def step():
        y, aux = forward(x)
        (y.square().mean() + 0.01 * aux).backward()
        module.zero_grad(set_to_none=True)  # as an optimizer step would leave them
        x.grad = None

    return step


def _flexmoe(w: AnchorWorkload, **plan) -> MoELayer:
    return MoELayer(
        w.model_dim,
        w.hidden_dim,
        w.num_experts,
        top_k=w.top_k,
        capacity_factor=w.capacity_factor,
        activation="relu",
        seed=0,
        **plan,
    )


def _variants(w: AnchorWorkload) -> dict[str, torch.nn.Module]:
    variants: dict[str, torch.nn.Module] = {FLEXMOE_ROW: _flexmoe(w)}
    probe = variants[FLEXMOE_ROW]
    for r in probe.layout.valid_degrees:
        for d in (1,) if r == 0 else STATIC_DEPTHS:
            variants[f"r={r} d={d}"] = _flexmoe(w, parallelism=r, pipeline_degree=d, all_to_all="flat")
    if deepspeed_moe.available():
        variants["deepspeed"] = deepspeed_moe.DeepSpeedMoE(
            model_dim=w.model_dim,
            hidden_dim=w.hidden_dim,
            num_experts=w.num_experts,
            top_k=w.top_k,
            capacity_factor=w.capacity_factor,
        )
    return variants


def _forward(module: torch.nn.Module) -> Callable:
    if isinstance(module, MoELayer):
        return lambda x: (module(x), module.aux_loss)
    return module


def _floor_steps(layer: MoELayer, group) -> dict[str, Callable[[], None]]:
    """The r = 1 floor's two parts, from the routing of `layer`'s last forward on every rank."""
    routing, lay = layer.last_routing, layer.layout
    received_E = routing.kept_E.clone()
    dist.all_reduce(received_E, group=group)  # rows every expert receives from all ranks
    start = lay.rank * lay.local_experts
    rows = received_E[start : start + lay.local_experts].tolist()
    gemms, _ = gemm_floor_steps(
        layer.experts.fc1_weight,
        layer.experts.fc2_weight,
        rows,
        hidden_dim=layer.config.hidden_dim,
        dtype=torch.float32,
    )
    send = torch.randn(lay.num_experts * routing.capacity * lay.model_dim)
    recv = torch.empty_like(send)

    def all_to_alls():
        for _ in range(4):  # forward out and back, backward out and back
            dist.all_to_all_single(recv, send, group=group)

    return {"floor gemms": gemms, "floor all-to-alls": all_to_alls}


def _timed_rounds(steps: dict[str, Callable[[], None]], rounds: int, group) -> dict[str, list[float]]:
    """Seconds per step of each, the slowest rank's, per round (a round runs every step once)."""
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            dist.barrier(group=group)
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    slowest = max_over_ranks([times[name] for name in steps], group)
    return dict(zip(steps, slowest, strict=True))


def _host_syncs(variants: dict[str, torch.nn.Module], x: torch.Tensor) -> dict[str, int]:
    out = {}
    for name, module in variants.items():
        if not isinstance(module, MoELayer):
            continue
        with torch.no_grad(), count_host_syncs() as counts:
            module(x)
        out[name] = sum(counts.values())
    return out


def breakdown(step: Callable[[], None], steps: int) -> dict[str, float]:
    """Milliseconds per step of the layer's named stages (forward) and its backward nodes, from a
    torch.profiler trace of `steps` steps on this rank (nested stages overlap: run_plan holds
    dispatch, exchange and combine)."""
    with profile() as trace:
        for _ in range(steps):
            step()
    out = {}
    for event in trace.key_averages():
        name = event.key
        if name.startswith("flexmoe.") or (name.endswith("Backward") and not name.startswith("autograd::")):
            out[name] = event.cpu_time_total / 1e3 / steps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def run_workload(w: AnchorWorkload, settings: AnchorSettings, group=None) -> dict:
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    torch.manual_seed(rank)
    x = torch.randn(w.tokens, w.model_dim, requires_grad=True)
    variants = _variants(w)
    steps = {name: _training_step(m, x, _forward(m)) for name, m in variants.items()}
    adaptive = variants[FLEXMOE_ROW]
    for _ in range(settings.adaptive_warmup):  # the tuner's cold start: not timed
        steps[FLEXMOE_ROW]()
    for name, step in steps.items():
        for _ in range(0 if name == FLEXMOE_ROW else settings.warmup):
            step()
    steps.update(_floor_steps(adaptive, group))
    per_round = _timed_rounds(steps, settings.rounds, group)
    seconds = {name: statistics.median(times) for name, times in per_round.items()}
    floor_s = seconds.pop("floor gemms") + seconds.pop("floor all-to-alls")
    syncs = _host_syncs(variants, x.detach())
    chosen = adaptive.last_plan
    plan_name = f"r={chosen.r} d={chosen.d}"
    stages = breakdown(steps[FLEXMOE_ROW], settings.profile_steps)
    deepspeed = per_round.get("deepspeed")

    def deepspeed_over(name: str) -> float | None:  # per round, then the median: drift cancels
        return None if deepspeed is None else paired_ratio(deepspeed, per_round[name])

    rows = [
        {
            "workload": w.name,
            "W": W,
            "variant": name,
            "ms": s * 1e3,
            "vs_deepspeed": deepspeed_over(name),
            "vs_floor": s / floor_s,
            "host_syncs": syncs.get(name),
            "plan": f"{plan_name} {chosen.all_to_all}" if name == FLEXMOE_ROW else "",
        }
        for name, s in seconds.items()
    ]
    rows.append({"workload": w.name, "W": W, "variant": "floor", "ms": floor_s * 1e3, "vs_floor": 1.0})
    static = {k: v for k, v in seconds.items() if k.startswith("r=")}
    best_static = min(static, key=static.get)
    return {
        "workload": asdict(w),
        "world_size": W,
        "rows": rows,
        "floor_s": floor_s,
        "best_static": best_static,
        "adaptive_plan": plan_name,
        "deepspeed_over_adaptive": deepspeed_over(FLEXMOE_ROW),
        "deepspeed_over_best_static": deepspeed_over(best_static),
        "adaptive_over_floor": seconds[FLEXMOE_ROW] / floor_s,
        "breakdown_ms_rank0": stages,
        "tuner": adaptive.tuner.table() if adaptive.tuner is not None else [],
    }


def run(workloads, settings: AnchorSettings, group=None) -> list[dict]:
    results = []
    for w in workloads:
        results.append(run_workload(w, settings, group))
        gc.collect()  # the workload's layers, and then their memory (cpu_memory)
        release_freed_memory()
    return results
