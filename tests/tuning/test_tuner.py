"""The run-time tuner on one process, driven with made-up step times (no wall clock): cold trials
discarded, round-robin order, the stopping rule, the exploration budget, re-exploration, persistence,
and the trial timer's end point."""

from __future__ import annotations

import pytest
import torch

from flexmoe.core.plans import Plan
from flexmoe.tuning.trial_stats import Summary, evaluate, round_relative, summarize
from flexmoe.tuning.trial_timer import time_step
from flexmoe.tuning.tuner import CHECK, EXPLOIT, EXPLORE, PlanTuner, TunerConfig

A, B, C, D = Plan(r=0), Plan(d=1), Plan(d=2), Plan(d=4)


class Ranking:
    """rank_plans stand-in: a fixed predicted order; remembers what the tuner fed back."""

    def __init__(self, predicted: dict[Plan, float]):
        self.predicted = predicted
        self.observed = []

    def __call__(self, capacity):
        return sorted(self.predicted.items(), key=lambda kv: kv[1])

    def observe(self, capacity, plan, seconds):
        self.observed.append((capacity, plan, seconds))


def make(predicted=None, **config) -> PlanTuner:
    predicted = predicted or {A: 1.0, B: 2.0, C: 3.0}
    config = {"max_candidates": 4, "check_every": 5, "min_trials": 2, **config}
    return PlanTuner(list(predicted), Ranking(predicted), config=TunerConfig(**config))


def drive(tuner: PlanTuner, seconds, steps: int, capacity=200) -> list[tuple[Plan, str]]:
    """`seconds(plan, n)`: the time of the n-th step of `plan` (0-based); every timed step reports."""
    seen, count = [], {}
    for _ in range(steps):
        plan, source = tuner.choose(capacity if not callable(capacity) else capacity(len(seen)))
        n = count[plan] = count.get(plan, -1) + 1
        if tuner.last_trial is not None:
            tuner.record(tuner.last_trial, seconds(plan, n))
        seen.append((plan, source))
    return seen


def fixed(times):
    return lambda plan, n: times[plan]


def test_round_robin_walk_in_predicted_order():
    tuner = make()
    seen = drive(tuner, fixed({A: 3.0, B: 3.0, C: 3.0}), 9)
    assert [p for p, _ in seen] == [A, B, C] * 3
    assert all(s == EXPLORE for _, s in seen)


def test_cold_trial_is_discarded():
    # A's first run is very slow (cold start); A is the fastest once warm
    tuner = make()
    drive(tuner, lambda p, n: 50.0 if (p == A and n == 0) else {A: 1.0, B: 2.0, C: 3.0}[p], 12)
    assert tuner.decisions[0]["plan"] == A.describe()
    row = next(r for r in tuner.table() if r["plan"] == A.describe())
    assert row["trials"] == 2 and row["measured_s"] == 1.0


def test_stops_once_the_best_is_separated():
    tuner = make(min_trials=2)
    seen = drive(tuner, fixed({A: 3.0, B: 1.0, C: 2.0}), 20)
    # 3 rounds (cold + 2 warm) then a confident decision
    assert [s for _, s in seen[:9]] == [EXPLORE] * 9
    assert all(s in (EXPLOIT, CHECK) for _, s in seen[9:]) and {p for p, _ in seen[9:]} == {B}
    decision = tuner.decisions[0]
    assert decision["reason"].endswith("separated") and decision["explore_steps"] == 9
    assert decision["explore_nonchosen_steps"] == 6


def test_clearly_slower_candidates_are_dropped_while_close_ones_keep_running():
    noisy = {B: [1.0, 1.0, 1.3, 0.9, 1.25, 0.95, 1.2], C: [1.1, 1.2, 0.95, 1.3, 1.0, 1.25, 1.0]}
    tuner = make(min_trials=2, max_trials=4)
    seen = drive(tuner, lambda p, n: 10.0 if p == A else noisy[p][min(n, 6)], 40)
    walked = [p for p, s in seen if s == EXPLORE]
    assert walked[:9] == [A, B, C] * 3 and A not in walked[9:]  # A dropped at the first verdict
    assert walked[9:] == [B, C] * 2  # until max_trials warm rounds
    assert tuner.decisions[0]["reason"].endswith("max trials")


class RefitRanking(Ranking):
    """Puts C before B once it has been fed trials, as a refit cost model may."""

    def __call__(self, capacity):
        order = super().__call__(capacity)
        return sorted(order, key=lambda kv: kv[0] != C) if self.observed else order


@pytest.mark.parametrize("refit", [False, True])
def test_survivors_the_trials_cannot_separate_are_ranked_by_the_refit_model(refit):
    noisy = {B: [1.0, 1.0, 1.3, 0.9, 1.25, 0.95, 1.2], C: [1.1, 1.2, 0.95, 1.3, 1.0, 1.25, 1.0]}
    predicted = {A: 1.0, B: 2.0, C: 3.0}
    ranking = (RefitRanking if refit else Ranking)(predicted)
    config = TunerConfig(max_candidates=4, check_every=5, min_trials=2, max_trials=4)
    tuner = PlanTuner(list(predicted), ranking, config=config)
    drive(tuner, lambda p, n: 10.0 if p == A else noisy[p][min(n, 6)], 40)
    decision = tuner.decisions[0]
    assert decision["reason"].endswith("max trials")
    # A was dropped by the trials; between B and C the model decides, after it saw the trials
    assert decision["plan"] == (C if refit else B).describe()
    assert {plan for _, plan, _ in ranking.observed} == {A, B, C}


def test_equivalent_candidates_end_the_exploration():
    tuner = make({A: 1.0, B: 2.0}, tolerance=0.05)
    # gap < noise < tolerance, and the noise is each candidate's own (it does not cancel within a round)
    drive(tuner, lambda p, n: {A: 1.0, B: 1.01}[p] * (1 + 0.02 * ((n + (p == B)) % 2)), 10)
    assert tuner.decisions[0]["reason"].endswith("equivalent") and tuner.decisions[0]["plan"] == A.describe()


def test_slow_spells_that_cover_a_round_cancel():
    # B is 5% faster; the machine is 1.6x slower in some rounds, which hits both of that round
    slow = [1.0, 1.6, 1.0, 1.7, 1.0]
    tuner = make({A: 1.0, B: 2.0}, min_trials=3)
    drive(tuner, lambda p, n: {A: 1.0, B: 0.95}[p] * slow[min(n, 4)], 12)
    decision = tuner.decisions[0]
    assert decision["plan"] == B.describe() and decision["reason"].endswith("separated")
    assert decision["explore_steps"] == 8  # decided at the first verdict: cold round + 3 warm ones


def test_evaluate_rule():
    best, close, far = Summary(1.0, 0.1, 3), Summary(1.15, 0.1, 3), Summary(2.0, 0.1, 3)
    v = evaluate([close, best, far], tolerance=0.0)
    assert v.best == 1 and v.keep == [0, 1] and not v.done
    assert evaluate([best, far], tolerance=0.0).reason == "separated"
    assert summarize([1.0, 5.0, 1.5]) == Summary(1.5, 1.4826 * 0.5, 3)
    relative = round_relative({A: {1: 2.0, 2: 4.0, 3: 9.0}, B: {1: 1.0, 2: 2.0}}, [A, B])
    assert relative == {A: [4 / 3, 4 / 3], B: [2 / 3, 2 / 3]}  # round 3 has one candidate: left out


def test_budget_caps_exploration_over_a_1000_step_run():
    # the capacity bucket changes every 40 steps over 25 buckets; timings never separate
    tuner = make({A: 1.0, B: 2.0, C: 3.0, D: 4.0})
    wobble = lambda p, n: 1.0 + 0.5 * ((n * 7 + hash(p.d)) % 3)  # noqa: E731
    drive(tuner, wobble, 1000, capacity=lambda i: 128 * (i // 40))
    summary = tuner.summary()
    assert summary["steps"] == 1000
    assert summary["explore_nonchosen_steps"] <= 0.05 * 1000
    predicted = [d for d in tuner.decisions if d["event"] == "predicted"]
    assert predicted, "later buckets must fall back to the cost model once the budget is spent"


def test_budget_zero_never_explores():
    tuner = make(explore_budget=0.0)
    seen = drive(tuner, fixed({A: 1.0, B: 2.0, C: 3.0}), 5)
    assert seen == [(A, EXPLOIT)] * 5 and tuner.decisions[0]["event"] == "predicted"


def test_drift_of_the_chosen_plan_triggers_bounded_reexploration():
    tuner = make(check_every=2, drift_window=2, drift_threshold=0.25, max_reexplorations=1)
    slow_after = 30  # B becomes 3x slower from its 30th step on; A then wins
    times = lambda p, n: {A: 2.0, B: 1.0 if n < slow_after else 3.0, C: 4.0}[p]  # noqa: E731
    seen = drive(tuner, times, 200)
    events = [d["event"] for d in tuner.decisions]
    assert events == ["decision", "drift", "decision"]
    assert tuner.decisions[0]["plan"] == B.describe() and tuner.decisions[2]["plan"] == A.describe()
    assert seen[-1][0] == A
    assert tuner.summary()["reexplorations"] == 1


def test_a_new_bucket_is_explored_and_known_ones_are_reused():
    tuner = make()
    drive(tuner, fixed({A: 3.0, B: 1.0, C: 2.0}), 12, capacity=200)
    assert tuner.choose(255) == (B, EXPLOIT)  # same bucket, capacity // 128 == 1
    assert tuner.choose(600)[1] == EXPLORE  # a new one
    assert tuner.choose(130)[0] == B  # back to the known one


def test_separate_tables_for_training_and_inference():
    tuner = make()
    drive(tuner, fixed({A: 3.0, B: 1.0, C: 2.0}), 12)
    assert tuner.choose(200, training=False)[1] == EXPLORE


def test_state_dict_round_trip_skips_known_buckets():
    tuner = make()
    drive(tuner, fixed({A: 3.0, B: 1.0, C: 2.0}), 12)
    state = tuner.state_dict()
    fresh = make()
    assert fresh.load_state_dict(state)
    assert fresh.choose(200) == (B, EXPLOIT)
    assert fresh.table()[0]["source"] in ("loaded", "")
    assert any(obs[1] == B for obs in fresh.rank_plans.observed)  # the cost model refit sees them
    assert fresh.state_dict()["buckets"] == state["buckets"]


def test_state_from_another_world_size_is_not_loaded():
    state = make().state_dict() | {"world_size": 4, "ranks": [0, 1, 2, 3]}
    fresh = make()
    assert not fresh.load_state_dict(state)
    assert "world_size" in fresh.load_note
    with pytest.raises(ValueError, match="state"):
        fresh.load_state_dict({"format": "other"})


@pytest.mark.parametrize(
    "field,value",
    [
        ("bucket_size", 0),
        ("max_candidates", 0),
        ("min_trials", 0),
        ("explore_budget", 1.5),
        ("check_every", 0),
    ],
)
def test_tuner_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        TunerConfig(**{field: value})


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_trial_timer_waits_for_the_parameter_gradients():
    tuner = make()
    tuner.clock = clock = FakeClock()
    recorded = []
    tuner.record = lambda trial, s: recorded.append(s)
    w = torch.nn.Parameter(torch.ones(3))
    x = torch.ones(3, requires_grad=True)
    y = x * w
    timer = time_step(tuner, "trial", forward_s=1.0, x=x, y=y, params=[w])
    clock.now = 10.0
    torch.autograd.backward(y.sum(), inputs=[x])  # the input gradient alone does not end the trial
    assert recorded == [] and not timer.done
    timer.cancel()
    # registered first, so it runs first: the parameter's gradient lands 5 s into the backward
    w.register_post_accumulate_grad_hook(lambda p: setattr(clock, "now", clock.now + 5.0))
    y = x * w
    timer = time_step(tuner, "trial", forward_s=1.0, x=x, y=y, params=[w])
    clock.now = 20.0
    y.sum().backward()
    assert recorded == [6.0]  # forward 1 s + backward from 20 s to the last gradient at 25 s


def test_trial_timer_records_the_forward_when_no_backward_runs():
    tuner = make()
    recorded = []
    tuner.record = lambda trial, s: recorded.append(s)
    with torch.no_grad():
        x = torch.ones(2)
        assert time_step(tuner, "t", forward_s=2.0, x=x, y=x * 2, params=[]) is None
    assert recorded == [2.0]


def test_reexploration_keeps_the_incumbent_among_the_candidates():
    tuner = make({A: 1.0, B: 2.0, C: 3.0}, max_candidates=2, check_every=2, drift_window=1)
    times = {A: 1.0, B: 2.0, C: 3.0}
    drive(tuner, fixed(times), 8)  # A chosen
    assert tuner.decisions[-1]["plan"] == A.describe()
    tuner.rank_plans.predicted = {A: 9.0, B: 2.0, C: 1.0}  # the refit now prefers C, B
    times[A] = 5.0  # and A drifts
    drive(tuner, fixed(times), 6)
    assert [d["event"] for d in tuner.decisions] == ["decision", "drift"]
    assert set(tuner.buckets[("train", 1)].candidates) == {C, A}
