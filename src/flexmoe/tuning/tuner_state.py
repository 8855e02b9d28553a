"""The run-time tuner's state: the ticket of a timed step, an exploration in progress, a bucket's
record; and their encoding as plain data that JSON and torch.load(weights_only=True) both take
(PlanTuner.state_dict / load_state_dict apply it). Only agreed numbers are saved, so every rank
saves the same thing."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch.distributed as dist

from flexmoe.core.plans import Plan
from flexmoe.tuning.trial_stats import Summary


@dataclass(frozen=True)
class Trial:
    """Ticket of one timed step: which bucket, which of its explorations, which plan, which round
    (0 = cold, discarded; -1 = a check while exploiting)."""

    key: tuple[str, int]
    generation: int
    plan: Plan
    round: int


@dataclass
class Exploration:
    alive: list[Plan]  # candidates still trialled, in the cost model's order
    reason: str
    started_step: int
    samples: dict[Plan, dict[int, float]] = field(default_factory=dict)  # warm trials by round, this rank's
    steps: Counter = field(default_factory=Counter)  # steps run per plan (cold ones included)
    agreed: dict[Plan, Summary] = field(default_factory=dict)
    round: int = 0
    position: int = 0
    seconds: float = 0.0

    def non_leader_steps(self, leader: Plan | None) -> int:
        return sum(n for p, n in self.steps.items() if p != leader)


@dataclass
class BucketState:
    capacity: int = 0  # the capacity it was last explored at (the cost model's refit samples)
    candidates: list[Plan] = field(default_factory=list)
    predicted: dict[Plan, float] = field(default_factory=dict)
    generation: int = 0
    exploration: Exploration | None = None
    best: Plan | None = None
    source: str = ""  # "trials" | "loaded" | "predicted"
    agreed: dict[Plan, Summary] = field(default_factory=dict)
    exploit_steps: int = 0
    checks_issued: int = 0
    drift_due: bool = False
    checks: list[float] = field(default_factory=list)  # this rank's recent check times
    last_check_s: float | None = None  # agreed
    reexplorations: int = 0


def group_identity(group) -> tuple[int, list[int]]:
    """(world size, global ranks) of the tuner's group: a saved decision holds only on the same one."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, [0]
    group = group or dist.group.WORLD
    return dist.get_world_size(group), list(dist.get_process_group_ranks(group))


def encode(buckets: dict, *, group: tuple[int, list[int]], bucket_size: int, counters: dict) -> dict:
    """The measured decisions of `buckets` as plain data (PlanTuner.state_dict)."""
    world_size, ranks = group
    entries = []
    for (phase, bucket), state in sorted(buckets.items()):
        if state.best is None or state.source == "predicted":
            continue  # only measured decisions are worth keeping
        entries.append(
            {
                "phase": phase,
                "bucket": bucket,
                "capacity": state.capacity,
                "plan": plan_to_dict(state.best),
                "measured": [
                    {**plan_to_dict(p), "median_s": s.median, "spread_s": s.spread, "trials": s.n}
                    for p, s in state.agreed.items()
                    if s.known
                ],
            }
        )
    return {
        "format": "flexmoe-tuner",
        "version": 1,
        "world_size": world_size,
        "ranks": ranks,
        "bucket_size": bucket_size,
        "buckets": entries,
        "counters": counters,
    }


@dataclass(frozen=True)
class Decoded:
    """What a saved state gives a tuner: decided buckets and budget counters, or why it gives none."""

    buckets: dict  # (phase, bucket) -> BucketState
    counters: dict[str, int]
    note: str
    taken: bool


def decode(state: dict, *, group: tuple[int, list[int]], bucket_size: int, known: set[Plan]) -> Decoded:
    """The decided buckets of `state` when it was recorded on the same group with the same bucket
    size (plans not in `known` skipped); else none, with the reason (PlanTuner.load_state_dict)."""
    if not isinstance(state, dict) or state.get("format") != "flexmoe-tuner":
        raise ValueError("state must be a dict from PlanTuner.state_dict() (format 'flexmoe-tuner')")
    world_size, ranks = group
    mismatch = [
        f"{name} {state.get(name)} (here {mine})"
        for name, mine in (("world_size", world_size), ("ranks", ranks), ("bucket_size", bucket_size))
        if state.get(name) != mine
    ]
    if mismatch:
        return Decoded({}, {}, _mismatch_note(mismatch, world_size), False)
    buckets = {}
    for entry in state.get("buckets", []):
        plan = plan_from_dict(entry["plan"])
        if plan not in known:
            continue
        key = (entry["phase"], int(entry["bucket"]))
        agreed = {}
        for m in entry.get("measured", []):
            agreed[plan_from_dict(m)] = Summary(float(m["median_s"]), float(m["spread_s"]), int(m["trials"]))
        capacity = int(entry.get("capacity") or key[1] * bucket_size + bucket_size // 2)
        buckets[key] = BucketState(
            capacity=capacity,
            candidates=[p for p in agreed if p in known] or [plan],
            best=plan,
            source="loaded",
            agreed=agreed,
            generation=1,
        )
    counters = {name: int(value) for name, value in (state.get("counters") or {}).items()}
    return Decoded(buckets, counters, _loaded_note(len(buckets), world_size), True)


# On one process every plan is the same local computation: the tuner never runs, so a state recorded
# there holds no bucket, and no state can change what this process does.
ONE_PROCESS = "one process: every plan is the same local computation, nothing to tune"


def _loaded_note(buckets: int, world_size: int) -> str:
    if buckets:
        return f"loaded {buckets} bucket(s)"
    if world_size == 1:
        return f"loaded 0 bucket(s): {ONE_PROCESS}"
    return "loaded 0 bucket(s): the state holds no measured decision"


def _mismatch_note(mismatch: list[str], world_size: int) -> str:
    if world_size == 1:
        return f"not loaded ({ONE_PROCESS}): recorded with " + ", ".join(mismatch)
    return "not loaded, exploring afresh: recorded with " + ", ".join(mismatch)


def plan_to_dict(plan: Plan) -> dict:
    return {"r": plan.r, "d": plan.d, "all_to_all": plan.all_to_all}


def plan_from_dict(entry: dict) -> Plan:
    return Plan(r=int(entry["r"]), d=int(entry["d"]), all_to_all=str(entry["all_to_all"]))
