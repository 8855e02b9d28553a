"""`flexmoe bench dist` (under torchrun): the step time of every static plan (r, d, all_to_all) for a
few workloads, side by side in one run, next to the cost model's prediction calibrated on this machine.

    torchrun --standalone --nproc-per-node 4 -m flexmoe.cli bench dist

Times are forward + backward of one MoE layer, medians over repeats after warm-up, and the MAX over
ranks (a step is as slow as its slowest rank).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist

from flexmoe import MoELayer, Plan
from flexmoe.bench.common import (
    add_cpu_allocator_argument,
    apply_cpu_allocator,
    environment,
    format_table,
    write_json,
)
from flexmoe.comm import ExpertGroups
from flexmoe.cost_model import PRESETS, ClusterSpec, CostModel, LayerShape, candidate_plans


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
    medians = torch.tensor([statistics.median(times[p]) for p in plans], dtype=torch.float64)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)
    return dict(zip(plans, medians.tolist(), strict=True))


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
        t = torch.tensor([statistics.median(times[2:])], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

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
    flops = 10 * 2 * 512**3 / (time.perf_counter() - start)
    base = PRESETS["cpu-gloo"]
    return replace(
        base,
        name=f"this machine, gloo, {threads} thread(s) per rank",
        intra_bandwidth=bandwidth,
        inter_bandwidth=bandwidth,
        intra_latency=latency,
        inter_latency=latency,
        flops=flops,
        launch_overhead=small / 2,
    )


def run(workloads, *, warmup: int, repeats: int, local_world_size: int | None) -> dict:
    W, rank = dist.get_world_size(), dist.get_rank()
    threads = torch.get_num_threads()
    probe = ExpertGroups(None, local_world_size=local_world_size)
    cluster = calibrate(probe, threads=threads)
    model = CostModel(cluster)
    rows = []
    for w in workloads:
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
        shape = LayerShape(
            model_dim=w.model_dim,
            hidden_dim=w.hidden_dim,
            num_experts=E,
            world_size=W,
            capacity=layer.last_plan.capacity,
            tokens=w.tokens,
            top_k=top_k,
            bytes_per_element=4,
        )
        plans = candidate_plans(shape, two_dh=layer.groups.supports_2dh)
        measured = _median_steps(layer, x, plans, warmup=warmup, repeats=repeats)
        static = measured[Plan()]
        best = min(measured, key=measured.get)
        predicted_best = model.rank(shape, plans)[0][0]
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
                    "vs_static": static / t,
                    "best": "*" if p == best else "",
                    "model_pick": "*" if p == predicted_best else "",
                }
            )
        if rank == 0:
            print(
                f"done: {w.name}: best {best.describe()} ({static / measured[best]:.2f}x over r=1 d=1 flat), "
                f"cost model picks {predicted_best.describe()}",
                flush=True,
            )
    return {"rows": rows, "cluster": asdict(cluster)}


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(prog="flexmoe bench dist", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--local-world-size",
        type=int,
        default=None,
        help="ranks per 'node' for 2dh (default: half the ranks when W >= 4)",
    )
    parser.add_argument("--out", default=None)
    add_cpu_allocator_argument(parser)
    args = parser.parse_args(argv)
    allocator = apply_cpu_allocator(args.cpu_allocator)
    if not dist.is_initialized():
        if not dist.is_torchelastic_launched():
            raise SystemExit(
                "run under torchrun: torchrun --standalone --nproc-per-node 4 -m flexmoe.cli bench dist"
            )
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    W = dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // W))
    local = args.local_world_size or (W // 2 if W >= 4 else None)
    result = run(
        QUICK if args.quick else WORKLOADS, warmup=args.warmup, repeats=args.repeats, local_world_size=local
    )
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
                    "vs_static",
                    "best",
                    "model_pick",
                ),
            )
        )
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
