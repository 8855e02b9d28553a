"""Run-time tuner: capacity bucket -> the best plan (r, d, all_to_all), found by timed trials.

A new bucket (floor(capacity / bucket_size)) is explored: the candidate plans are ranked by the cost
model, the best few are run for a few steps each and timed (forward, plus backward when there is
one), the medians are agreed across ranks (all-reduce MAX, so every rank picks the same plan), and
the winner is used until the bucket changes. Training (forward + backward) and inference (forward
only) keep separate tables: their best plans differ. All ranks see the same capacity (it is agreed before
the plan is chosen), so they walk the same candidates in the same order.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from flexmoe.comm import WeakGroup
from flexmoe.plans import Plan


@dataclass(frozen=True, kw_only=True)
class TunerConfig:
    bucket_size: int = 128
    max_candidates: int = 4
    trials_per_candidate: int = 2
    pipeline_degrees: tuple[int, ...] = (1, 2, 4, 8)

    def __post_init__(self) -> None:
        for name in ("bucket_size", "max_candidates", "trials_per_candidate"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.pipeline_degrees or min(self.pipeline_degrees) < 1:
            raise ValueError(f"pipeline_degrees must be ints >= 1, got {self.pipeline_degrees}")


@dataclass
class BucketState:
    candidates: list[Plan]
    predicted: dict[Plan, float]
    timings: dict[Plan, list[float]] = field(default_factory=dict)
    best: Plan | None = None
    agreed: dict[Plan, float] = field(default_factory=dict)
    explore_calls: int = 0
    explore_seconds: float = 0.0


class PlanTuner:
    """One per layer. `choose(capacity)` -> (plan, source); `record` adds a trial's time; decisions
    are exposed by `table()`.

    Which candidate a trial runs is decided by the count of exploring calls, never by which timings
    arrived, so every rank walks the candidates in lockstep even if a rank misses a measurement."""

    def __init__(self, candidates: list[Plan], rank_plans, *, config: TunerConfig, group=None):
        self.all_candidates = candidates
        self.rank_plans = rank_plans  # capacity -> [(plan, predicted seconds)] best first
        self.config = config
        self._group = WeakGroup(group)  # held weakly, like the layer's (see WeakGroup)
        self.buckets: dict[tuple[str, int], BucketState] = {}
        self.decisions: list[dict] = []

    @property
    def group(self):
        return self._group()

    def bucket(self, capacity: int, training: bool) -> tuple[str, int]:
        return ("train" if training else "eval", capacity // self.config.bucket_size)

    def choose(self, capacity: int, *, training: bool = True, device=None) -> tuple[Plan, str]:
        """`device`: where the agreement all-reduce runs (the layer's; NCCL needs CUDA tensors)."""
        if len(self.all_candidates) == 1:
            return self.all_candidates[0], "tuner"
        key = self.bucket(capacity, training)
        state = self.buckets.get(key)
        if state is None:
            ranked = self.rank_plans(capacity)[: self.config.max_candidates]
            state = BucketState(candidates=[p for p, _ in ranked], predicted=dict(ranked))
            self.buckets[key] = state
        if state.best is not None:
            return state.best, "tuner"
        trial = state.explore_calls // self.config.trials_per_candidate
        if trial >= len(state.candidates):
            self._decide(key, state, device)
            return state.best, "tuner"
        state.explore_calls += 1
        return state.candidates[trial], "tuner-explore"

    def record(self, capacity: int, plan: Plan, seconds: float, *, training: bool = True) -> None:
        state = self.buckets.get(self.bucket(capacity, training))
        if state is None or state.best is not None:
            return
        state.timings.setdefault(plan, []).append(seconds)
        state.explore_seconds += seconds

    def _decide(self, key: tuple[str, int], state: BucketState, device) -> None:
        medians = [
            statistics.median(state.timings[p]) if state.timings.get(p) else float("inf")
            for p in state.candidates
        ]
        agreed = torch.tensor(medians, dtype=torch.float64, device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.group)  # the slowest rank decides
        state.agreed = dict(zip(state.candidates, agreed.tolist(), strict=True))
        state.best = min(state.candidates, key=lambda p: state.agreed[p])
        self.decisions.append(
            {
                "phase": key[0],
                "bucket": key[1],
                "plan": state.best.describe(),
                "seconds": state.agreed[state.best],
                "explore_steps": state.explore_calls,
                "explore_seconds": state.explore_seconds,
            }
        )

    def table(self) -> list[dict]:
        rows = []
        for key, state in sorted(self.buckets.items()):
            for plan in state.candidates:
                times = state.timings.get(plan, [])
                rows.append(
                    {
                        "phase": key[0],
                        "bucket": key[1],
                        "plan": plan.describe(),
                        "predicted_s": state.predicted.get(plan),
                        "measured_s": state.agreed.get(plan, statistics.median(times) if times else None),
                        "trials": len(times),
                        "chosen": plan == state.best,
                    }
                )
        return rows
