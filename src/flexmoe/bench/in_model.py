"""The adaptive runtime measured the way users run it: several MoE layers with dense work between them,
the adaptive model exploring from its first step, against copies of it (identical weights) with every
layer forced to one static plan, one copy per plan, all of them interleaved step by step (one round =
one step of every variant, the order rotated each round) so that a slow spell of this shared machine
hits all alike.

A drifting workload changes the routing skew during the run (dynamic capacity, cf < 0): balanced,
then most tokens pushed towards one expert, then balanced again, so the capacity bucket (and the
best plan) changes twice; optionally the number of tokens per step changes with it (a sequence-length
or batch-size schedule).

Step times are forward + backward of the whole model, MAX over ranks (a step is as slow as its
slowest rank).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flexmoe import MoELayer, Plan
from flexmoe.parallel.comm import max_over_ranks
from flexmoe.tuning.ranker import spearman
from flexmoe.tuning.tuner import EXPLORE, TunerConfig


@dataclass(frozen=True, kw_only=True)
class Phase:
    """What the model sees during one stretch of a drifting run."""

    skew: float = 0.0
    tokens: int | None = None  # per rank; None: the run's token count


class MoEStack(nn.Module):
    """x + MoE(norm(x)), then x + MLP(norm(x)), `layers` times. `skew` pushes every MoE layer's input
    towards its gate's expert 0 (a routing skew the drifting workload turns up and down)."""

    def __init__(self, M: int, H: int, E: int, *, layers: int, seed: int, **moe_kwargs):
        super().__init__()
        torch.manual_seed(seed)  # dense parameters identical on every rank and in every variant
        self.norms = nn.ModuleList(nn.LayerNorm(M) for _ in range(layers))
        self.moes = nn.ModuleList(MoELayer(M, H, E, seed=seed + i, **moe_kwargs) for i in range(layers))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(M), nn.Linear(M, 2 * M), nn.GELU(), nn.Linear(2 * M, M))
            for _ in range(layers)
        )
        self.skew = 0.0

    def forward(self, x: torch.Tensor, plan: Plan | None = None) -> torch.Tensor:
        for norm, moe, mlp in zip(self.norms, self.moes, self.mlps, strict=True):
            h = norm(x)
            if self.skew:
                direction = F.normalize(moe.gate.weight[0].detach(), dim=0)
                h = h + self.skew * h.shape[-1] ** 0.5 * direction
            x = x + moe(h, plan=plan)
            x = x + mlp(x)
        return x


def _step(model: MoEStack, x: torch.Tensor, plan: Plan | None) -> float:
    dist.barrier()
    start = time.perf_counter()
    model(x, plan=plan).square().mean().backward()
    seconds = time.perf_counter() - start
    for p in model.parameters():
        p.grad = None
    return seconds


def compare(
    *,
    M: int,
    H: int,
    E: int,
    top_k: int,
    capacity_factor: float,
    tokens: int,
    layers: int,
    rounds: int,
    plans: list[Plan],
    cluster,
    local_world_size: int | None,
    degrees: tuple[int, ...],
    schedule: Callable[[int], Phase] | None = None,
) -> dict:
    """Interleaved rounds of the adaptive model and the model forced to each static plan.
    schedule(round) -> Phase (skew, tokens); None: no skew, `tokens` every round. Returns per-variant
    step times (MAX over ranks), the adaptive layers' decisions, exploration summaries and their refit
    rankers."""
    rank = dist.get_rank()
    kwargs = dict(
        top_k=top_k,
        capacity_factor=capacity_factor,
        local_world_size=local_world_size,
        cluster=cluster,
        tuner=TunerConfig(pipeline_degrees=degrees),
    )
    variants: list[Plan | None] = [None, *plans]  # None: adaptive
    # one model per variant, identical weights: each runs one plan throughout, as a user's model does
    # (a model shared by every static plan favoured some of them by ~6% under oversubscription)
    models = [
        MoEStack(M, H, E, layers=layers, seed=11, **(kwargs if plan is None else {**kwargs, "tuner": False}))
        for plan in variants
    ]
    adaptive = models[0]
    phases = [schedule(i) if schedule else Phase() for i in range(rounds)]
    most = max(p.tokens or tokens for p in phases)
    x_all = torch.randn(most, M, generator=torch.Generator().manual_seed(1000 + rank))
    times = [[0.0] * rounds for _ in variants]
    exploring_rounds, adaptive_steps = [], []
    for i in range(rounds):
        for model in models:
            model.skew = phases[i].skew
        x = x_all[: phases[i].tokens or tokens]
        order = list(range(len(variants)))
        shift = i % len(order)
        for v in order[shift:] + order[:shift]:  # round 0 starts with the adaptive model
            plan = variants[v]
            times[v][i] = _step(models[v], x, plan)
            if plan is None:
                records = [m.last_plan for m in adaptive.moes]
                adaptive_steps.append([(r.plan.describe(), r.capacity, r.source) for r in records])
                if any(r.source == EXPLORE for r in records):
                    exploring_rounds.append(i)
    times = max_over_ranks(times)
    return {
        "times": {
            ("adaptive" if p is None else p.describe()): t for p, t in zip(variants, times, strict=True)
        },
        "exploring_rounds": exploring_rounds,
        "adaptive_steps": adaptive_steps,  # per round, per layer: (plan, capacity, source)
        "decisions": [m.tuner.decisions for m in adaptive.moes],
        "tables": [m.tuner.table() for m in adaptive.moes],
        "exploration": [m.tuner.summary() for m in adaptive.moes],
        "rankers": [m.tuner.rank_plans for m in adaptive.moes],
        "capacities": [m.last_plan.capacity for m in adaptive.moes],
    }


def summarize_stationary(result: dict, layer_times: dict[str, float], *, rounds: int) -> dict:
    """Steady state: the rounds after the adaptive model's last exploring step (at least the second
    half). Best static = lowest median there; the ratio is the median of per-round paired ratios."""
    times = result["times"]
    settled = max(rounds // 2, (max(result["exploring_rounds"]) + 1) if result["exploring_rounds"] else 0)
    window = range(settled, rounds) if settled < rounds else range(rounds // 2, rounds)
    medians = {name: statistics.median(t[i] for i in window) for name, t in times.items()}
    statics = {k: v for k, v in medians.items() if k != "adaptive"}
    best = min(statics, key=statics.get)
    ratio = statistics.median(times["adaptive"][i] / times[best][i] for i in window)
    chosen = [d[-1]["plan"] if d else None for d in result["decisions"]]
    layer_best = min(layer_times.values()) if layer_times else None
    return {
        "best_static": best,
        "best_static_ms": statics[best] * 1e3,
        "adaptive_ms": medians["adaptive"] * 1e3,
        "adaptive_vs_best": ratio,
        "steady_rounds": len(window),
        "chosen": chosen,
        # each layer's choice, priced by the single-layer static table of the same run
        "chosen_vs_best_layer": [
            layer_times[c] / layer_best if (c in layer_times and layer_best) else None for c in chosen
        ],
        "chosen_vs_best_static_model": [statics[c] / statics[best] if c in statics else None for c in chosen],
        "static_ms": {k: v * 1e3 for k, v in statics.items()},
    }


def summarize_totals(result: dict, phases: int = 3) -> dict:
    """Whole-run totals (exploration included): the drifting workload's yardstick; and per phase
    (thirds of the run) the median step of every variant, to see which plan wins when."""
    times = result["times"]
    totals = {name: sum(t) for name, t in times.items()}
    rounds = len(next(iter(times.values())))
    per_phase, phase_totals = [], []
    for k in range(phases):
        window = range(k * rounds // phases, (k + 1) * rounds // phases)
        medians = {name: statistics.median(t[i] for i in window) * 1e3 for name, t in times.items()}
        per_phase.append(medians)
        phase_totals.append({name: sum(t[i] for i in window) for name, t in times.items()})
    statics = {k: v for k, v in totals.items() if k != "adaptive"}
    best = min(statics, key=statics.get)
    return {
        "best_static": best,
        "best_static_total_s": statics[best],
        "adaptive_total_s": totals["adaptive"],
        "adaptive_vs_best": totals["adaptive"] / statics[best],
        "static_total_s": statics,
        "phase_median_ms": per_phase,
        "phase_total_s": phase_totals,
        "decisions": [[(d["event"], d["bucket"], d["plan"]) for d in layer] for layer in result["decisions"]],
    }


def exploration_report(result: dict, *, horizon: int = 1000) -> dict:
    """Steps on non-chosen plans per layer: of this run's steps, and of a `horizon`-step run."""
    summaries = result["exploration"]
    nonchosen = max(s["explore_nonchosen_steps"] for s in summaries)
    steps = max(s["steps"] for s in summaries)
    return {
        "steps": steps,
        "explore_steps": max(s["explore_steps"] for s in summaries),
        "explore_nonchosen_steps": nonchosen,
        "explore_pct_of_run": 100 * nonchosen / steps if steps else 0.0,
        f"explore_pct_of_{horizon}": 100 * nonchosen / horizon,
        "reexplorations": sum(s["reexplorations"] for s in summaries),
    }


def rank_correlation(ranker, capacity: int, measured: dict[Plan, float]) -> float:
    plans = [p for p in measured if p in ranker.plans]
    return spearman([ranker.predict(capacity, p) for p in plans], [measured[p] for p in plans])


def ranking_report(ranker, capacity: int, layer_s: dict[Plan, float], model_ms: dict[str, float]) -> dict:
    """The refit cost model's ranking against both measurements of the plans: the layer alone
    (`layer_s`) and the whole model forced to each plan (`model_ms`, by plan description: what the
    tuner's trials see and users pay); and how far the two measurements rank the plans alike, which
    bounds what any model can score against either."""
    in_model = {p: model_ms[p.describe()] for p in layer_s if p.describe() in model_ms}
    return {
        "spearman_refit": rank_correlation(ranker, capacity, layer_s),
        "spearman_refit_in_model": rank_correlation(ranker, capacity, in_model),
        "spearman_layer_vs_model": spearman([layer_s[p] for p in in_model], list(in_model.values())),
    }
