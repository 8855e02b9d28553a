"""`flexmoe bench dist` (under torchrun): for a few workloads,

1. in a model (bench/in_model.py): several MoE layers with dense work between them, the ADAPTIVE
   model exploring from its first step against copies of it (identical weights), each forced to one
   static plan, interleaved step by step; adaptive vs best static, each layer's decision, exploration
   spent;
2. one layer alone: the step time of every static plan, next to the cost model's prediction
   calibrated on this machine and after the tuner's online refit (Spearman rank correlations against
   the layer alone and against the model forced to each plan, and of the two measurements together);
3. a drifting workload: routing skew turned up and down during the run with a dynamic capacity
   (cf < 0), so the best plan changes mid-run; whole-run totals, adaptive vs the best single plan.

    torchrun --standalone --nproc-per-node 4 -m flexmoe.cli bench dist

Times are forward + backward, medians (or totals) over interleaved rounds, MAX over ranks (a step is
as slow as its slowest rank).
"""

from __future__ import annotations

import datetime
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

from flexmoe import MoELayer, Plan
from flexmoe.app.cli_args import (
    ArgumentParser,
    add_cpu_allocator_argument,
    apply_cpu_allocator,
    nonnegative_int,
    positive_int,
)
from flexmoe.app.reporting import environment, format_table
from flexmoe.bench import anchors
from flexmoe.bench.anchors import ANCHOR_COLUMNS, ANCHOR_WORKLOADS, QUICK_ANCHORS, AnchorSettings
from flexmoe.bench.common import matmul_rates
from flexmoe.bench.in_model import (
    Phase,
    compare,
    exploration_report,
    ranking_report,
    summarize_stationary,
    summarize_totals,
)
from flexmoe.json_file import write_json
from flexmoe.parallel.comm import ExpertGroups, max_over_ranks
from flexmoe.tuning.cost_model import (
    PRESETS,
    ClusterSpec,
    CostModel,
    LayerShape,
    candidate_plans,
    with_node_size,
)
from flexmoe.tuning.ranker import spearman


@dataclass(frozen=True, kw_only=True)
class DistWorkload:
    name: str
    model_dim: int
    hidden_dim: int
    experts_per_rank: float  # E = experts_per_rank * W (0.5: two ranks share each expert)
    tokens: int  # per rank
    top_k: int = 2
    capacity_factor: float = 1.0

    def num_experts(self, world_size: int) -> int:
        return max(1, int(self.experts_per_rank * world_size))


WORKLOADS = (
    DistWorkload(
        name="few tokens, large experts", model_dim=512, hidden_dim=2048, experts_per_rank=1, tokens=256
    ),
    DistWorkload(
        name="many tokens, small experts", model_dim=128, hidden_dim=256, experts_per_rank=2, tokens=4096
    ),
    DistWorkload(name="balanced", model_dim=256, hidden_dim=1024, experts_per_rank=1, tokens=1024),
    DistWorkload(
        name="E < W (sharded experts)", model_dim=256, hidden_dim=2048, experts_per_rank=0.5, tokens=1024
    ),
)
QUICK = tuple(
    replace(w, tokens=max(64, w.tokens // 16), hidden_dim=w.hidden_dim // 4) for w in WORKLOADS[::3]
)


# The drifting workloads: balanced, skewed, balanced (thirds of the run), k = 1, dynamic capacity.
# The best plan must really change between phases, and by a wide margin:
# - balanced: each rank's share of the expert GEMMs is the same in every plan, so r = 0 only adds the
#   all-gather of every expert's weights (and the reduce-scatter of their gradients), which large
#   experts (H = 32 M) make costly next to few tokens: expert parallel r = 1 wins;
# - skewed (skew 1.0 sends all tokens to expert 0, capacity = T, a new bucket): under r = 1 the rank
#   holding expert 0 multiplies the W * T rows of every rank while the others wait, r = 0 keeps each
#   rank's GEMMs on its own T rows: r = 0 wins.
# With the skew alone (T = 448 throughout, the balance point of the weight gather against one rank's
# GEMMs) each phase's best plan beats the other's by only ~1.25-1.3x on a 2-core gloo machine at W = 2:
# the margins multiply to at most (2 GEMMs + dense) / (1 GEMM + dense) < 2. Real runs also change the
# number of tokens per step (sequence-length or batch-size schedules); the second workload couples
# the skew with it: few tokens while balanced (the weight gather dominates, r = 0 is ~1.6x slower),
# many while skewed (the hot rank's GEMMs dominate, r = 1 is ~1.35x slower): measured at W = 2 on
# 3 layers, a perfect per-phase choice is ~0.82x the best single plan.
# M = 128 keeps the dense work between the MoE layers (an MLP of width 2 M) small next to the experts.
@dataclass(frozen=True, kw_only=True)
class DriftingWorkload:
    name: str
    workload: DistWorkload
    phases: tuple[Phase, ...]  # equal parts of the run, in order


_DRIFT_SHAPE = DistWorkload(
    name="drift",
    model_dim=128,
    hidden_dim=4096,
    experts_per_rank=1,
    tokens=448,
    top_k=1,
    capacity_factor=-4.0,
)
DRIFTING = (
    DriftingWorkload(
        name="drifting skew (cf < 0)",
        workload=_DRIFT_SHAPE,
        phases=(Phase(), Phase(skew=1.0), Phase()),
    ),
    DriftingWorkload(
        name="drifting skew and tokens (cf < 0)",
        workload=_DRIFT_SHAPE,
        phases=(Phase(tokens=128), Phase(skew=1.0, tokens=512), Phase(tokens=128)),
    ),
)
DEGREES = (1, 2, 4)  # d = 8 never paid on this kind of machine; fewer variants, shorter runs


def drift_schedule(rounds: int, phases: tuple[Phase, ...]):
    """round -> its phase: the run split into len(phases) equal parts (as summarize_totals splits it)."""
    n = len(phases)
    return lambda i: phases[max(k for k in range(n) if k * rounds // n <= i)]


def _median_steps(layer: MoELayer, x: torch.Tensor, plans: list[Plan], *, warmup: int, repeats: int):
    """Median step time of every plan, measured in interleaved rounds (one step of each plan per round)
    so that this shared machine's slow spells hit all plans alike; MAX over ranks."""
    times: dict[Plan, list[float]] = {p: [] for p in plans}
    for i in range(warmup + repeats):
        for plan in plans:
            dist.barrier()
            start = time.perf_counter()
            layer(x, plan=plan).square().mean().backward()
            if i >= warmup:
                times[plan].append(time.perf_counter() - start)
    medians = max_over_ranks([statistics.median(times[p]) for p in plans])
    return dict(zip(plans, medians, strict=True))


def calibrate(groups: ExpertGroups, *, threads: int) -> ClusterSpec:
    """Measure this machine's all-to-all latency and bandwidth and its GEMM rate."""

    def a2a_seconds(numel: int) -> float:
        buf = torch.randn(groups.world_size, max(1, numel // groups.world_size))
        times = []
        for _ in range(7):
            dist.barrier()
            start = time.perf_counter()
            groups.all_to_all_start(buf, "flat").wait()
            times.append(time.perf_counter() - start)
        return max_over_ranks([statistics.median(times[2:])])[0]

    small, large = a2a_seconds(1024), a2a_seconds(4 * 1024 * 1024)
    moved = 4 * 4 * 1024 * 1024 * (groups.world_size - 1) / groups.world_size
    bandwidth = moved / max(large - small, 1e-6)
    latency = small / max(1, groups.world_size - 1)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    gemm_s = time.perf_counter() - start
    big = torch.randn(4 * 1024 * 1024)
    out = torch.empty_like(big)
    start = time.perf_counter()
    for _ in range(10):
        out.copy_(big)
    copy_s = time.perf_counter() - start
    tiny = torch.ones(1)
    start = time.perf_counter()
    for _ in range(1000):
        tiny.add_(1)
    kernel_s = time.perf_counter() - start
    # the layers check at construction that every rank has the same cluster figures (they decide
    # which candidates the tuners walk): the local timings are agreed, MAX over ranks (slowest rank)
    gemm_s, copy_s, kernel_s = max_over_ranks([gemm_s, copy_s, kernel_s])
    flops = 10 * 2 * 512**3 / gemm_s
    memory_bandwidth = 10 * 2 * big.numel() * 4 / copy_s  # read + write
    kernel_overhead = kernel_s / 1000
    base = PRESETS["cpu-gloo"]
    return replace(
        base,
        name=f"this machine, gloo, {threads} thread(s) per rank",
        intra_bandwidth=bandwidth,
        inter_bandwidth=bandwidth,
        intra_latency=latency,
        inter_latency=latency,
        flops=flops,
        memory_bandwidth=memory_bandwidth,
        kernel_overhead=kernel_overhead,
        launch_overhead=small / 2,
    )


def _layer_shape(w: DistWorkload, W: int, capacity: int) -> LayerShape:
    E = w.num_experts(W)
    return LayerShape(
        model_dim=w.model_dim,
        hidden_dim=w.hidden_dim,
        num_experts=E,
        world_size=W,
        capacity=capacity,
        tokens=w.tokens,
        top_k=min(w.top_k, E),
        bytes_per_element=4,
    )


def _in_model(w: DistWorkload, W: int, cluster, local_world_size, *, layers: int, rounds: int, schedule=None):
    E = w.num_experts(W)
    plans = candidate_plans(_layer_shape(w, W, 1), two_dh=local_world_size is not None, degrees=DEGREES)
    plans = [p for p in plans if p.all_to_all == "flat" or (local_world_size and 1 < local_world_size < W)]
    return compare(
        M=w.model_dim,
        H=w.hidden_dim,
        E=E,
        top_k=min(w.top_k, E),
        capacity_factor=w.capacity_factor,
        tokens=w.tokens,
        layers=layers,
        rounds=rounds,
        plans=plans,
        cluster=cluster,
        local_world_size=local_world_size,
        degrees=DEGREES,
        schedule=schedule,
    )


def run(
    workloads,
    *,
    warmup: int,
    repeats: int,
    local_world_size: int | None,
    layers: int,
    rounds: int,
    drift_rounds: int,
    drifting_workloads: tuple[DriftingWorkload, ...] = DRIFTING,
) -> dict:
    W, rank = dist.get_world_size(), dist.get_rank()
    threads = torch.get_num_threads()
    probe = ExpertGroups(None, local_world_size=local_world_size)
    # priced on the layers' node size, as every layer's tuner prices it
    cluster = with_node_size(calibrate(probe, threads=threads), probe.node_size)
    model = CostModel(cluster)
    local = matmul_rates()  # the slowest rank's rates (MIN: MAX of the negated values)
    rates = dict(zip(local, (-v for v in max_over_ranks([-v for v in local.values()])), strict=True))
    if rank == 0:
        print(
            f"square matmul per rank, all ranks at once: fp32 {rates['fp32_gflops']:.0f} GFLOP/s, "
            f"bf16 {rates['bf16_gflops']:.0f} GFLOP/s",
            flush=True,
        )
        print(
            f"calibrated ({threads} thread(s) per rank): fp32 GEMM {cluster.flops / 1e9:.1f} GFLOP/s, "
            f"all-to-all {cluster.intra_bandwidth / 1e9:.2f} GB/s, "
            f"latency {cluster.intra_latency * 1e6:.0f} us, "
            f"copy {cluster.memory_bandwidth / 1e9:.1f} GB/s",
            flush=True,
        )
    rows, adaptive_rows = [], []
    for w in workloads:
        # the model first: its adaptive layers explore from the process's first MoE step of this shape
        in_model = (
            _in_model(w, W, cluster, local_world_size, layers=layers, rounds=rounds) if rounds else None
        )
        E = w.num_experts(W)
        top_k = min(w.top_k, E)
        layer = MoELayer(
            w.model_dim,
            w.hidden_dim,
            E,
            top_k=top_k,
            capacity_factor=w.capacity_factor,
            seed=0,
            local_world_size=local_world_size,
            tuner=False,
        )
        x = torch.randn(w.tokens, w.model_dim, generator=torch.Generator().manual_seed(rank))
        layer(x)
        shape = _layer_shape(w, W, layer.last_plan.capacity)
        plans = candidate_plans(shape, two_dh=layer.groups.supports_2dh)
        measured = _median_steps(layer, x, plans, warmup=warmup, repeats=repeats)
        static = measured[Plan()]
        best = min(measured, key=measured.get)
        predicted_best = model.rank(shape, plans)[0][0]
        ranker = in_model["rankers"][0] if in_model else None
        for p, t in measured.items():
            rows.append(
                {
                    "workload": w.name,
                    "W": W,
                    "E": E,
                    "capacity": shape.capacity,
                    "plan": p.describe(),
                    "measured_ms": t * 1e3,
                    "predicted_ms": model.step_time(shape, p) * 1e3,
                    "refit_ms": ranker.predict(shape.capacity, p) * 1e3
                    if ranker and p in ranker.plans
                    else None,
                    "vs_static": static / t,
                    "best": "*" if p == best else "",
                    "model_pick": "*" if p == predicted_best else "",
                }
            )
        spearman_prior = spearman([model.step_time(shape, p) for p in plans], [measured[p] for p in plans])
        if in_model:
            layer_times = {p.describe(): t for p, t in measured.items()}
            stationary = summarize_stationary(in_model, layer_times, rounds=rounds)
            row = {
                "workload": w.name,
                "W": W,
                **stationary,
                **exploration_report(in_model),
                "spearman_prior": spearman_prior,
                **ranking_report(ranker, shape.capacity, measured, stationary["static_ms"]),
                "refit_scales": ranker.scales(),
                "tuner_tables": in_model["tables"],
                "decisions": in_model["decisions"],
            }
            adaptive_rows.append(row)
        if rank == 0:
            print(
                f"done: {w.name}: best {best.describe()} ({static / measured[best]:.2f}x over r=1 d=1 flat), "
                f"cost model picks {predicted_best.describe()}"
                + (
                    f"; in a model: adaptive {row['adaptive_ms']:.1f} ms vs best static {row['best_static']} "
                    f"{row['best_static_ms']:.1f} ms ({row['adaptive_vs_best']:.3f}x)"
                    if in_model
                    else ""
                ),
                flush=True,
            )
    drifts = []
    for drifting in drifting_workloads if drift_rounds else ():
        result = _in_model(
            drifting.workload,
            W,
            cluster,
            local_world_size,
            layers=layers,
            rounds=drift_rounds,
            schedule=drift_schedule(drift_rounds, drifting.phases),
        )
        drift = {
            "workload": drifting.name,
            "W": W,
            "phases": [asdict(p) for p in drifting.phases],
            **summarize_totals(result, phases=len(drifting.phases)),
            **exploration_report(result),
            "round_ms": {name: [t * 1e3 for t in times] for name, times in result["times"].items()},
            "adaptive_steps": result["adaptive_steps"],
            "tuner_tables": result["tables"],
        }
        drifts.append(drift)
        if rank == 0:
            print(
                f"done: {drifting.name}: adaptive {drift['adaptive_total_s']:.2f} s vs best static "
                f"{drift['best_static']} {drift['best_static_total_s']:.2f} s "
                f"({drift['adaptive_vs_best']:.3f}x)",
                flush=True,
            )
    return {
        "rows": rows,
        "adaptive": adaptive_rows,
        "drifting": drifts,
        "cluster": asdict(cluster),
        "matmul_rates": rates,
    }


ADAPTIVE_COLUMNS = (
    "workload",
    "W",
    "best_static",
    "best_static_ms",
    "adaptive_ms",
    "adaptive_vs_best",
    "chosen",
    "chosen_vs_best_layer",
    "explore_nonchosen_steps",
    "explore_pct_of_1000",
    "spearman_prior",
    "spearman_refit",
    "spearman_refit_in_model",
    "spearman_layer_vs_model",
)
DRIFT_COLUMNS = (
    "workload",
    "W",
    "best_static",
    "best_static_total_s",
    "adaptive_total_s",
    "adaptive_vs_best",
    "explore_nonchosen_steps",
    "reexplorations",
    "decisions",
)


def drift_phase_rows(drift: dict) -> list[dict]:
    """Per phase of the drifting workload: every variant's median step (ms), the phase's best static
    plan and its margin over the runner-up, adaptive against it; and the totals of the phase."""
    rows = []
    for k, (medians, totals) in enumerate(zip(drift["phase_median_ms"], drift["phase_total_s"], strict=True)):
        statics = {n: v for n, v in medians.items() if n != "adaptive"}
        ranked = sorted(statics, key=statics.get)
        rows.append(
            {
                "phase": k,
                **{f"{n} ms": v for n, v in medians.items()},
                "phase_best": ranked[0],
                "runner_up_vs_best": statics[ranked[1]] / statics[ranked[0]] if len(ranked) > 1 else None,
                "adaptive_vs_phase_best": medians["adaptive"] / statics[ranked[0]],
                "adaptive_total_s": totals["adaptive"],
                "best_static_total_s": min(v for n, v in totals.items() if n != "adaptive"),
            }
        )
    return rows


def _pick(items: tuple, indices: str | None) -> tuple:
    """`indices`: comma-separated positions in `items`; None or '': all of them."""
    return tuple(items[int(i)] for i in indices.split(",")) if indices else items


def main(argv: list[str] | None = None) -> dict | None:
    parser = ArgumentParser(prog="flexmoe bench dist", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--warmup", type=nonnegative_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument(
        "--local-world-size",
        type=positive_int,
        default=None,
        help="ranks per 'node' for 2dh (default: half the ranks when W >= 4)",
    )
    parser.add_argument(
        "--layers", type=positive_int, default=3, help="MoE layers of the in-model comparison"
    )
    parser.add_argument(
        "--rounds",
        type=nonnegative_int,
        default=60,
        help="interleaved rounds of the in-model comparison (0: skip it)",
    )
    parser.add_argument(
        "--drift-rounds",
        type=nonnegative_int,
        default=240,
        help="rounds of each drifting workload, in three phases (0: skip them)",
    )
    parser.add_argument(
        "--drifts", default=None, help="comma-separated indices into the drifting workloads (default: all)"
    )
    parser.add_argument(
        "--workloads",
        default=None,
        help="comma-separated indices into the workload list ('none': the drifting workloads only)",
    )
    parser.add_argument(
        "--anchors",
        default=None,
        help="comma-separated indices into the workloads run against DeepSpeed-MoE and the distributed "
        "floor (default: all; 'none': skip them)",
    )
    parser.add_argument(
        "--anchor-rounds", type=positive_int, default=8, help="interleaved rounds of each anchor workload"
    )
    parser.add_argument("--out", default=None)
    add_cpu_allocator_argument(parser)
    args = parser.parse_args(argv)
    allocator = apply_cpu_allocator(args.cpu_allocator)
    if not dist.is_initialized():
        if not dist.is_torchelastic_launched():
            raise ValueError(
                "run under torchrun: torchrun --standalone --nproc-per-node 4 -m flexmoe.cli bench dist"
            )
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    W = dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // W))
    local = args.local_world_size or (W // 2 if W >= 4 else None)
    workloads = QUICK if args.quick else WORKLOADS
    workloads = () if args.workloads == "none" else _pick(workloads, args.workloads)
    result = run(
        workloads,
        warmup=args.warmup,
        repeats=args.repeats,
        local_world_size=local,
        layers=min(args.layers, 2) if args.quick else args.layers,
        rounds=min(args.rounds, 24) if args.quick else args.rounds,
        drift_rounds=min(args.drift_rounds, 30) if args.quick else args.drift_rounds,
        drifting_workloads=_pick(DRIFTING, args.drifts),
    )
    anchor_workloads = QUICK_ANCHORS if args.quick else ANCHOR_WORKLOADS
    anchor_workloads = () if args.anchors == "none" else _pick(anchor_workloads, args.anchors)
    settings = AnchorSettings(rounds=args.anchor_rounds)
    if args.quick:
        settings = AnchorSettings(adaptive_warmup=6, warmup=1, rounds=2, profile_steps=1)
    result["anchors"] = anchors.run(anchor_workloads, settings)
    payload = None
    if dist.get_rank() == 0:
        print(
            format_table(
                result["rows"],
                (
                    "workload",
                    "W",
                    "E",
                    "capacity",
                    "plan",
                    "measured_ms",
                    "predicted_ms",
                    "refit_ms",
                    "vs_static",
                    "best",
                    "model_pick",
                ),
            )
        )
        if result["adaptive"]:
            print(format_table(result["adaptive"], ADAPTIVE_COLUMNS))
        for anchor in result["anchors"]:
            print(format_table(anchor["rows"], ANCHOR_COLUMNS))
            stages = ", ".join(f"{k} {v:.1f}" for k, v in anchor["breakdown_ms_rank0"].items())
            print(f"  {anchor['adaptive_plan']} on rank 0, ms per step: {stages}")
        if result["drifting"]:
            print(format_table(result["drifting"], DRIFT_COLUMNS))
        for drift in result["drifting"]:
            phase_rows = drift_phase_rows(drift)
            print(drift["workload"])
            print(format_table(phase_rows, list(phase_rows[0])))
        payload = {
            "environment": environment(
                benchmark="dist",
                world_size=W,
                local_world_size=local,
                threads=torch.get_num_threads(),
                cpu_allocator=allocator,
            ),
            **result,
        }
        print(f"wrote {write_json(args.out or f'bench_results/dist_w{W}.json', payload)}")
    dist.destroy_process_group()
    return payload
