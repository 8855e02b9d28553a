"""Run-time tuner: capacity bucket -> the best plan (r, d, all_to_all), found by timed trials
(DESIGN section 6).

Life of a bucket (floor(capacity / bucket_size), separate tables for training and inference):

1. explore: the cost model ranks the candidates; the best few run round-robin, one step each per
   round (A B C D A B C D ...), so a slow spell of the machine hits all of them alike. Round 0 is
   cold (first use of a plan's buffers and shapes, the process's own warm-up) and is discarded. From
   `min_trials` warm rounds on, after every round the per-candidate medians and spreads of the
   round-relative times (each trial over its round's median, so a slow spell covering a round
   cancels) are agreed across ranks (MAX), and candidates clearly slower than the best are dropped
   (trial_stats.evaluate); the
   exploration ends when the best is separated from the rest, or the rest are within `tolerance` of
   it (the best wins), or after `max_trials` warm rounds, or when the exploration budget would be
   exceeded: then the survivors' medians differ by less than their noise, and the cost model, refit
   on the agreed trials, picks among them (on a noisy machine the trials alone chose plans up to 8%
   slower in the model while its refit ranked the fastest first, `flexmoe bench dist` at W = 4).
2. exploit: the winner runs; one step in `check_every` is timed. When the median of the last
   `drift_window` checks (agreed across ranks) is `drift_threshold` slower than the trials showed,
   the bucket is explored again (at most `max_reexplorations` times, within budget).

Budget: steps spent on plans that were not chosen stay below `explore_budget` of
max(steps so far, budget_horizon). A bucket met when the budget is spent gets the cost model's pick.

Lockstep: which plan a step runs depends only on the count of calls and on agreed statistics, so
every rank walks the same candidates and calls the same collectives, whatever its own timings say.
The layer times a step and hands the time back with the `Trial` ticket `choose` left in
`last_trial`; a late or stale time (another exploration by then) is dropped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from flexmoe.core.plans import Plan
from flexmoe.parallel.comm import FinishedWork, WeakGroup
from flexmoe.tuning import tuner_state
from flexmoe.tuning.trial_stats import (
    UNKNOWN,
    agree_summaries,
    agree_value,
    evaluate,
    round_relative,
    summarize,
)
from flexmoe.tuning.tuner_state import BucketState, Exploration, Trial

EXPLORE, EXPLOIT, CHECK = "tuner-explore", "tuner", "tuner-check"


@dataclass(frozen=True, kw_only=True)
class TunerConfig:
    bucket_size: int = 128
    max_candidates: int = 4
    min_trials: int = 3  # warm trials per candidate before the first verdict (2 give no usable spread)
    max_trials: int = 6  # warm trials per candidate at most; then the cost model picks among the survivors
    tolerance: float = 0.03  # plans this close to the best (measured that precisely) count as equal
    explore_budget: float = 0.05  # share of steps that may run non-chosen plans...
    budget_horizon: int = 1000  # ...of max(steps so far, this): a fresh run may spend 5% of 1,000 at once
    check_every: int = 25  # while exploiting, time one step in this many
    drift_window: int = 3  # checks whose median is compared with the trials
    drift_threshold: float = 0.25  # re-explore when that median is this much slower than the trials
    max_reexplorations: int = 2  # per bucket
    pipeline_degrees: tuple[int, ...] = (1, 2, 4, 8)

    def __post_init__(self) -> None:
        for name in ("bucket_size", "max_candidates", "min_trials", "check_every", "drift_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("max_reexplorations", "budget_horizon"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_trials < self.min_trials:
            raise ValueError(f"max_trials must be >= min_trials={self.min_trials}, got {self.max_trials}")
        if not 0 <= self.explore_budget <= 1:
            raise ValueError(f"explore_budget must be in [0, 1], got {self.explore_budget}")
        for name in ("tolerance", "drift_threshold"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.pipeline_degrees or min(self.pipeline_degrees) < 1:
            raise ValueError(f"pipeline_degrees must be ints >= 1, got {self.pipeline_degrees}")


class PlanTuner:
    """One per layer. `choose(capacity)` -> (plan, source) and leaves a `Trial` in `last_trial` when
    the step must be timed; `record(trial, seconds)` takes the time back. Decisions: `decisions`,
    `table()`, `summary()`; persistence: `state_dict()` / `load_state_dict()`.

    `rank_plans(capacity)` -> [(plan, predicted seconds)] best first; if it has `observe(capacity,
    plan, seconds)` it is fed the agreed trial medians (the online refit of the cost model)."""

    def __init__(self, candidates: list[Plan], rank_plans, *, config: TunerConfig, group=None, clock=None):
        self.all_candidates = list(candidates)
        self.rank_plans = rank_plans
        self.config = config
        self._group = WeakGroup(group)  # held weakly, like the layer's (see WeakGroup)
        self.finished = FinishedWork()  # the agreements' collectives (see FinishedWork)
        self.clock = clock or time.perf_counter  # the layer times trials with it (tests inject one)
        self.buckets: dict[tuple[str, int], BucketState] = {}
        self.decisions: list[dict] = []
        self.last_trial: Trial | None = None
        self.steps = 0  # choose() calls
        self.explore_steps = 0  # steps that ran an exploration trial
        self.spent = 0  # exploration steps of finished explorations on plans that were not chosen
        self.load_note: str | None = None

    @property
    def group(self):
        return self._group()

    @property
    def exploring(self) -> bool:
        """Whether some bucket is being explored (the same answer on every rank)."""
        return any(s.exploration is not None for s in self.buckets.values())

    # -- the walk ----------------------------------------------------------------------------------
    def bucket(self, capacity: int, training: bool) -> tuple[str, int]:
        return ("train" if training else "eval", capacity // self.config.bucket_size)

    def choose(self, capacity: int, *, training: bool = True, device=None) -> tuple[Plan, str]:
        """`device`: where the agreement all-reduces run (the layer's; NCCL needs CUDA tensors)."""
        self.last_trial = None
        if len(self.all_candidates) == 1:
            return self.all_candidates[0], EXPLOIT
        self.steps += 1
        key = self.bucket(capacity, training)
        state = self.buckets.get(key)
        if state is None:
            state = self.buckets[key] = BucketState()
            self._start(key, state, capacity, reason="new bucket")
        if state.exploration is not None:
            plan = self._explore_step(key, state, device)
            if plan is not None:
                return plan, EXPLORE
        return self._exploit_step(key, state, capacity, device)

    def record(self, trial: Trial | None, seconds: float) -> None:
        state = None if trial is None else self.buckets.get(trial.key)
        if state is None or trial.generation != state.generation or not math.isfinite(seconds):
            return  # stale: the bucket has moved on since this step was chosen
        if trial.round < 0:
            state.checks = (state.checks + [seconds])[-self.config.drift_window :]
            return
        ex = state.exploration
        if ex is None:
            return
        ex.seconds += seconds
        if trial.round > 0:  # round 0 is cold: discarded
            ex.samples.setdefault(trial.plan, {})[trial.round] = seconds

    def allowance(self) -> float:
        c = self.config
        return c.explore_budget * max(self.steps, c.budget_horizon)

    def _affordable(self, extra_steps: int, ongoing: int = 0) -> bool:
        return self.spent + ongoing + extra_steps <= self.allowance()

    def _start(self, key, state: BucketState, capacity: int, *, reason: str) -> None:
        everything = list(self.rank_plans(capacity))
        ranked = everything[: self.config.max_candidates]
        incumbent = [pt for pt in everything[len(ranked) :] if pt[0] == state.best]
        if incumbent:  # re-exploring: the plan that drifted stays among the candidates
            ranked = ranked[:-1] + incumbent
        state.capacity = capacity
        state.candidates = [p for p, _ in ranked]
        state.predicted = dict(ranked)
        # the cheapest exploration: every candidate cold + min_trials warm, all but one not chosen
        cheapest = (len(ranked) - 1) * (1 + self.config.min_trials)
        if len(ranked) > 1 and self._affordable(cheapest):
            state.generation += 1  # times of steps chosen before this are stale from now on
            state.exploration = Exploration(
                alive=list(state.candidates), reason=reason, started_step=self.steps
            )
            return
        if state.best is None:  # nothing measured: trust the model
            state.best, state.source = state.candidates[0], "predicted"
            self._log(key, state, event="predicted", reason=f"{reason}; exploration budget spent")

    def _explore_step(self, key, state: BucketState, device) -> Plan | None:
        ex, c = state.exploration, self.config
        if ex.position == len(ex.alive):  # a round is complete
            ex.round, ex.position = ex.round + 1, 0
            warm = ex.round - 1
            if warm >= c.min_trials:
                n = len(ex.alive)
                absolute = [summarize(list(ex.samples.get(p, {}).values())) for p in ex.alive]
                relative = round_relative(ex.samples, ex.alive)
                # one all-reduce for both: seconds (the table, drift checks, the refit) and the
                # round-relative times the verdict is taken on
                summaries = absolute + [summarize(relative[p]) for p in ex.alive]
                agreed = agree_summaries(summaries, self.group, device, self.finished)
                ex.agreed.update(zip(ex.alive, agreed[:n], strict=True))
                verdict = evaluate(agreed[n:], c.tolerance)
                leader = ex.alive[verdict.best]
                ex.alive = [ex.alive[i] for i in verdict.keep]
                reason = verdict.reason
                if not verdict.done and warm >= c.max_trials:
                    reason = "max trials"
                elif not verdict.done and not self._affordable(
                    len(ex.alive) - 1, ex.non_leader_steps(leader)
                ):
                    reason = "budget"
                if reason:
                    self._observe(state, ex)
                    if not verdict.done:
                        # the trials allowed could not tell the survivors apart: their medians differ
                        # by less than the noise, and the cost model, refit just now on every
                        # candidate's agreed trials, is the better judge of which is fastest
                        leader = self._model_pick(state.capacity, ex.alive, leader)
                    self._finish(key, state, leader, reason)
                    return None
        plan = ex.alive[ex.position]
        ex.position += 1
        ex.steps[plan] += 1
        self.explore_steps += 1
        self.last_trial = Trial(key, state.generation, plan, ex.round)
        return plan

    def _finish(self, key, state: BucketState, best: Plan, reason: str) -> None:
        ex = state.exploration
        state.best, state.source, state.agreed = best, "trials", dict(ex.agreed)
        state.exploration = None
        state.generation += 1
        state.exploit_steps = state.checks_issued = 0
        state.drift_due = False
        state.checks, state.last_check_s = [], None
        self.spent += ex.non_leader_steps(best)
        self._log(key, state, event="decision", reason=f"{ex.reason}: {reason}", exploration=ex)

    def _observe(self, state: BucketState, ex) -> None:
        """Feed the agreed trial medians to the ranker's online refit, where it has one."""
        observe = getattr(self.rank_plans, "observe", None)
        if observe is not None:
            for plan, s in ex.agreed.items():
                if s.known:
                    observe(state.capacity, plan, s.median)

    def _model_pick(self, capacity: int, survivors: list[Plan], fallback: Plan) -> Plan:
        """The survivor the ranker puts first (the same on every rank: it was fed agreed numbers)."""
        return next((p for p, _ in self.rank_plans(capacity) if p in survivors), fallback)

    def _exploit_step(self, key, state: BucketState, capacity: int, device) -> tuple[Plan, str]:
        c = self.config
        if state.drift_due:  # the step after a window of checks: their times have arrived
            state.drift_due = False
            if self._drifted(key, state, capacity, device):
                plan = self._explore_step(key, state, device)
                if plan is not None:
                    return plan, EXPLORE
        state.exploit_steps += 1
        if state.source != "predicted" and state.exploit_steps % c.check_every == 0:
            state.checks_issued += 1
            state.drift_due = state.checks_issued % c.drift_window == 0
            self.last_trial = Trial(key, state.generation, state.best, -1)
            return state.best, CHECK
        return state.best, EXPLOIT

    def _drifted(self, key, state: BucketState, capacity: int, device) -> bool:
        """Agree on the chosen plan's recent step time; re-explore when it is well above the trials'."""
        c = self.config
        local = summarize(state.checks).median if state.checks else 0.0  # 0: MAX takes the others'
        state.last_check_s = agree_value(local, self.group, device, self.finished)
        base = state.agreed.get(state.best, UNKNOWN)
        if not (base.known and state.last_check_s > base.median * (1 + c.drift_threshold)):
            return False
        if state.reexplorations >= c.max_reexplorations:
            return False
        previous = state.best
        state.reexplorations += 1
        self._log(
            key, state, event="drift", reason=f"checks {state.last_check_s:.4g}s vs trials {base.median:.4g}s"
        )
        self._start(key, state, capacity, reason=f"drift from {previous.describe()}")
        return state.exploration is not None

    # -- reporting ---------------------------------------------------------------------------------
    def _log(self, key, state: BucketState, *, event: str, reason: str, exploration=None) -> None:
        entry = {
            "event": event,
            "phase": key[0],
            "bucket": key[1],
            "step": self.steps,
            "plan": None if state.best is None else state.best.describe(),
            "seconds": state.agreed.get(state.best, UNKNOWN).median if state.best else None,
            "reason": reason,
        }
        if exploration is not None:
            entry.update(
                explore_steps=sum(exploration.steps.values()),
                explore_nonchosen_steps=exploration.non_leader_steps(state.best),
                explore_seconds=exploration.seconds,
                rounds=exploration.round,
            )
        self.decisions.append(entry)

    def table(self) -> list[dict]:
        """One row per (bucket, candidate): predicted and agreed measured time, trials, status."""
        rows = []
        for key, state in sorted(self.buckets.items()):
            ex = state.exploration
            agreed = ex.agreed if ex is not None else state.agreed
            for plan in state.candidates:
                s = agreed.get(plan, UNKNOWN)
                if ex is not None:
                    status = "exploring" if plan in ex.alive else "eliminated"
                else:
                    status = "chosen" if plan == state.best else ("tried" if s.known else "untried")
                rows.append(
                    {
                        "phase": key[0],
                        "bucket": key[1],
                        "plan": plan.describe(),
                        "predicted_s": state.predicted.get(plan),
                        "measured_s": s.median if s.known else None,
                        "spread_s": s.spread if s.known else None,
                        "trials": s.n,
                        "chosen": ex is None and plan == state.best,
                        "status": status,
                        "source": state.source if plan == state.best else "",
                        "last_check_s": state.last_check_s if plan == state.best else None,
                        "reexplorations": state.reexplorations,
                    }
                )
        return rows

    def summary(self) -> dict:
        """Exploration cost so far: steps on non-chosen plans against the budget."""
        ongoing = sum(
            s.exploration.non_leader_steps(None) for s in self.buckets.values() if s.exploration is not None
        )
        nonchosen = self.spent + ongoing
        return {
            "steps": self.steps,
            "explore_steps": self.explore_steps,
            "explore_nonchosen_steps": nonchosen,
            "explore_fraction": nonchosen / self.steps if self.steps else 0.0,
            "budget_steps": self.allowance(),
            "reexplorations": sum(s.reexplorations for s in self.buckets.values()),
            "buckets": len(self.buckets),
        }

    # -- persistence (tuner_state.py) ----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain data (JSON- and weights_only-safe): the decided buckets with their agreed trials, the
        group they were measured on, and the budget counters."""
        counters = {"steps": self.steps, "explore_steps": self.explore_steps, "spent": self.spent}
        return tuner_state.encode(
            self.buckets,
            group=tuner_state.group_identity(self.group),
            bucket_size=self.config.bucket_size,
            counters=counters,
        )

    def load_state_dict(self, state: dict) -> bool:
        """Take the decided buckets of `state` when it was recorded on the same group (world size and
        ranks) with the same bucket size; else keep exploring afresh (the reason is in `load_note`).
        Returns whether it was taken. Plans this layer cannot run are skipped."""
        decoded = tuner_state.decode(
            state,
            group=tuner_state.group_identity(self.group),
            bucket_size=self.config.bucket_size,
            known=set(self.all_candidates),
        )
        self.load_note = decoded.note
        if not decoded.taken:
            return False
        self.buckets.update(decoded.buckets)
        observe = getattr(self.rank_plans, "observe", None)  # the loaded trials refit the cost model too
        if observe is not None:
            for state_of_bucket in decoded.buckets.values():
                for plan, summary in state_of_bucket.agreed.items():
                    observe(state_of_bucket.capacity, plan, summary.median)
        self.steps = max(self.steps, decoded.counters.get("steps", 0))
        self.explore_steps = max(self.explore_steps, decoded.counters.get("explore_steps", 0))
        self.spent = max(self.spent, decoded.counters.get("spent", 0))
        return True
