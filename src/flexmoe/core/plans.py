"""Execution plans: which parallel degree r, pipelining depth d and all-to-all algorithm one forward
runs with (DESIGN sections 3-5), and the record of what actually ran.

A plan is data; `flexmoe.parallel.strategies` turns it into the small strategy object that executes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexmoe.core.config import ALL_TO_ALL_ALGORITHMS


@dataclass(frozen=True, kw_only=True)
class Plan:
    """r: 0 = data parallel, r >= 1 = expert parallel with r-way model parallel inside an expert;
    d: number of capacity chunks the all-to-all is pipelined in; all_to_all: "flat" or "2dh" (each
    assignment of a token to an expert travels), or "dedup" (each token travels once to each rank
    that holds any of its experts; r = 1 on whole experts, d = 1)."""

    r: int = 1
    d: int = 1
    all_to_all: str = "flat"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise ValueError(f"r must be an int >= 0, got {self.r!r}")
        if isinstance(self.d, bool) or not isinstance(self.d, int) or self.d < 1:
            raise ValueError(f"d must be an int >= 1, got {self.d!r}")
        if self.all_to_all not in ALL_TO_ALL_ALGORITHMS:
            raise ValueError(f"all_to_all must be one of {ALL_TO_ALL_ALGORITHMS}, got {self.all_to_all!r}")
        if self.all_to_all == "dedup" and self.d != 1:
            raise ValueError(f"all_to_all='dedup' is not pipelined: d must be 1, got {self.d}")

    def describe(self) -> str:
        return f"r={self.r} d={self.d} {self.all_to_all}"


STATIC_DEFAULT = Plan(r=1, d=1, all_to_all="flat")


@dataclass(frozen=True, kw_only=True)
class PlanRecord:
    """What the last forward ran with; `source` says who chose it: "forced" (plan= argument),
    "fixed" (layer settings), "local" (adaptive on one process, where every plan is the same local
    computation and the tuner does not run), "static-default" (adaptive without a tuner),
    "tuner-explore" / "tuner" / "tuner-check" (the run-time tuner: a trial, its decision, its
    decision timed to catch a drift)."""

    r: int
    d: int
    all_to_all: str
    capacity: int
    source: str

    @property
    def plan(self) -> Plan:
        return Plan(r=self.r, d=self.d, all_to_all=self.all_to_all)
