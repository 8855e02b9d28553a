"""Trial statistics of the run-time tuner: robust summaries of timed steps, their agreement across
ranks, and the rule that says when the fastest candidate is known (DESIGN section 6).

Everything that decides which plan runs next is computed from AGREED numbers (all-reduce MAX over
the group), never from one rank's own timings: ranks that walked different candidates would call
different collectives and deadlock.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch.distributed as dist

from flexmoe.parallel.comm import max_over_ranks

# the median absolute deviation times this estimates a normal distribution's standard deviation
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class Summary:
    """median and spread (scaled median absolute deviation, a robust standard deviation) of one
    candidate's warm trials; n of them."""

    median: float
    spread: float
    n: int

    @property
    def known(self) -> bool:
        return self.n > 0 and math.isfinite(self.median)


UNKNOWN = Summary(math.inf, math.inf, 0)


def summarize(samples: list[float]) -> Summary:
    """Median and median absolute deviation: one slow trial (a neighbour's burst, a page fault) moves
    neither, unlike a mean and a standard deviation."""
    if not samples:
        return UNKNOWN
    med = statistics.median(samples)
    return Summary(med, MAD_TO_SIGMA * statistics.median(abs(s - med) for s in samples), len(samples))


def round_relative(samples: dict, plans: list) -> dict:
    """Each warm trial divided by the median time of its round (the candidates that ran in it):
    round-robin makes the candidates of one round neighbours in time, so a slow spell of the machine
    that covers a round scales all of them and cancels here, which it does not in raw medians.
    samples: {plan: {round: seconds}}; rounds with fewer than two candidates timed are left out."""
    rounds = sorted({r for p in plans for r in samples.get(p, {})})
    relative = {p: [] for p in plans}
    for r in rounds:
        present = {p: samples[p][r] for p in plans if r in samples.get(p, {})}
        if len(present) < 2:
            continue
        middle = statistics.median(present.values())
        for p, t in present.items():
            relative[p].append(t / middle)
    return relative


def agree_summaries(summaries: list[Summary], group, device=None, finished=None) -> list[Summary]:
    """Element-wise MAX over the group of (median, spread) and MIN of n: a step is as slow as its
    slowest rank, and a candidate is as well measured as its least measured rank. Every rank gets the
    same list back. One all-reduce of 3 * len(summaries) float64s (kept in `finished`: see
    flexmoe.parallel.comm.FinishedWork)."""
    if not _distributed(group) or not summaries:
        return list(summaries)
    values = [v for s in summaries for v in (s.median, s.spread, -float(s.n))]
    t = max_over_ranks(values, group, device=device, finished=finished)
    # n travels negated: MAX of -n is -MIN of n
    triples = zip(t[0::3], t[1::3], t[2::3], strict=True)
    return [Summary(m, sp, int(-n)) if -n > 0 else UNKNOWN for m, sp, n in triples]


def agree_value(value: float, group, device=None, finished=None) -> float:
    """MAX over the group of one float (e.g. the median of the chosen plan's recent checks)."""
    if not _distributed(group):
        return value
    return float(max_over_ranks([value], group, device=device, finished=finished)[0])


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def separated(best: Summary, other: Summary) -> bool:
    """`other` is slower than `best` with confidence: the gap exceeds both spreads together."""
    return other.median - best.median > best.spread + other.spread


def equivalent(best: Summary, other: Summary, tolerance: float) -> bool:
    """Within `tolerance` of `best`, and both measured precisely enough to say so: whichever wins,
    the step is within tolerance of the fastest."""
    bound = tolerance * best.median
    return other.median - best.median <= bound and max(best.spread, other.spread) <= bound


@dataclass(frozen=True)
class Verdict:
    """What one evaluation of an exploration's agreed statistics concluded."""

    best: int  # index into the alive candidates
    keep: list[int]  # indices still worth trialling (best included)
    done: bool
    reason: str  # "separated" | "equivalent" | "" (not done)


def evaluate(agreed: list[Summary], tolerance: float) -> Verdict:
    """Successive elimination on agreed statistics: drop every candidate clearly slower than the best;
    the exploration is done when one is left ("separated") or every survivor is within tolerance of
    the best ("equivalent"). Ties go to the earlier candidate (the cost model's order)."""
    known = [i for i, s in enumerate(agreed) if s.known]
    if not known:
        return Verdict(0, list(range(len(agreed))), False, "")
    best = min(known, key=lambda i: (agreed[i].median, i))
    keep = [i for i in range(len(agreed)) if i == best or not separated(agreed[best], agreed[i])]
    if len(keep) == 1:
        return Verdict(best, keep, True, "separated")
    rest = [i for i in keep if i != best]
    if all(agreed[i].known and equivalent(agreed[best], agreed[i], tolerance) for i in rest):
        return Verdict(best, keep, True, "equivalent")
    return Verdict(best, keep, False, "")
