"""The tuner on 2 gloo ranks: identical decisions when the ranks' own timings disagree, and a resumed
run (checkpoint or plan file) that explores nothing it already knows."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from flexmoe import MoELayer
from flexmoe.checkpoint import load_checkpoint, save_checkpoint
from flexmoe.core.plans import Plan
from flexmoe.testing.distributed import DistributedPool
from flexmoe.tuning.plan_table import export_plan_table
from flexmoe.tuning.tuner import EXPLORE, PlanTuner, TunerConfig


@pytest.fixture(scope="module")
def pool():
    with DistributedPool(2, collective_timeout_s=30.0, timeout_s=240.0) as p:
        yield p


class _Order:
    def __init__(self, plans):
        self.plans = plans

    def __call__(self, capacity):
        return [(p, float(i)) for i, p in enumerate(self.plans)]


def disagreeing_worker() -> dict:
    """Rank 0 finds A fastest, rank 1 finds B fastest (A is slow there); the MAX over ranks says B."""
    rank = dist.get_rank()
    a, b, c = Plan(r=0), Plan(d=1), Plan(d=2)
    local = {0: {a: 1.0, b: 2.0, c: 4.0}, 1: {a: 6.0, b: 2.5, c: 4.0}}[rank]
    tuner = PlanTuner([a, b, c], _Order([a, b, c]), config=TunerConfig(check_every=3, drift_window=2))
    sources, plans = [], []
    for step in range(40):
        plan, source = tuner.choose(300)
        if tuner.last_trial is not None:
            jitter = 0.01 * ((step * (rank + 3)) % 5)  # different noise on every rank
            tuner.record(tuner.last_trial, local[plan] + jitter)
        sources.append(source)
        plans.append(plan.describe())
    return {"sources": sources, "plans": plans, "decisions": tuner.decisions, "table": tuner.table()}


@pytest.mark.timeout(120)
def test_ranks_with_disagreeing_timings_make_identical_decisions(pool):
    first, second = pool.run(disagreeing_worker)
    assert first["plans"] == second["plans"] and first["sources"] == second["sources"]
    local = "explore_seconds"  # this rank's own time spent exploring: the one field that may differ
    assert [{k: v for k, v in d.items() if k != local} for d in first["decisions"]] == [
        {k: v for k, v in d.items() if k != local} for d in second["decisions"]
    ]
    assert first["table"] == second["table"]
    assert first["decisions"][0]["plan"] == Plan(d=1).describe()  # B: the slowest rank decides


FAST = TunerConfig(min_trials=1, max_trials=2)


def _layer(**kw) -> MoELayer:
    return MoELayer(16, 32, 4, top_k=2, seed=3, tuner=FAST, **kw)


def _run(layer: MoELayer, steps: int, stop_when_settled: bool = False) -> list[str]:
    rank = dist.get_rank()
    sources = []
    for step in range(steps):
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(step * 10 + rank))
        layer(x).square().mean().backward()
        sources.append(layer.last_plan.source)
        if stop_when_settled and not layer.tuner.exploring:
            break
    return sources


def resume_worker(tmp: str) -> dict:
    tuned = _layer()
    first = _run(tuned, 40, stop_when_settled=True)
    save_checkpoint(tmp, tuned)
    table = export_plan_table(tuned)

    resumed = _layer()
    load_checkpoint(tmp, resumed)
    from_checkpoint = _run(resumed, 12)

    from_file = _run(_layer(plan_table=table), 12)

    elsewhere = table["layers"][""]["tuner"] | {"world_size": 4, "ranks": [0, 1, 2, 3]}
    other = _layer(plan_table=elsewhere)
    return {
        "first": first,
        "chosen": tuned.last_plan.plan.describe(),
        "from_checkpoint": from_checkpoint,
        "checkpoint_plans": resumed.last_plan.plan.describe(),
        "from_file": from_file,
        "other_world": _run(other, 3),
        "other_note": other.tuner.load_note,
    }


@pytest.mark.timeout(240)
def test_a_resumed_run_does_not_explore_known_buckets(pool, tmp_path):
    results = pool.run(resume_worker, str(tmp_path / "ckpt"))
    for res in results:
        assert EXPLORE in res["first"]
        assert EXPLORE not in res["from_checkpoint"] and EXPLORE not in res["from_file"]
        assert res["checkpoint_plans"] == res["chosen"]
        assert res["other_world"][0] == EXPLORE and "world_size" in res["other_note"]
    assert results[0]["chosen"] == results[1]["chosen"]


def in_model_worker() -> dict:
    from flexmoe.bench.dist import drift_schedule
    from flexmoe.bench.in_model import (
        Phase,
        compare,
        exploration_report,
        summarize_stationary,
        summarize_totals,
    )
    from flexmoe.tuning.cost_model import PRESETS

    result = compare(
        M=8,
        H=16,
        E=4,
        top_k=1,
        capacity_factor=-2.0,
        tokens=32,
        layers=2,
        rounds=6,
        plans=[Plan(r=0), Plan(d=1), Plan(d=2)],
        cluster=PRESETS["cpu-gloo"],
        local_world_size=None,
        degrees=(1, 2),
        # the second half: skewed routing and twice the tokens (a new capacity bucket)
        schedule=drift_schedule(6, (Phase(), Phase(skew=0.5, tokens=64))),
    )
    layer_times = {"r=0 d=1 flat": 1.0, "r=1 d=1 flat": 2.0, "r=1 d=2 flat": 3.0}
    return {
        "stationary": summarize_stationary(result, layer_times, rounds=6),
        "totals": summarize_totals(result),
        "exploration": exploration_report(result),
        "capacities": result["capacities"],
        "times": result["times"],
        "steps": result["adaptive_steps"],
    }


@pytest.mark.timeout(240)
def test_in_model_benchmark_runs_and_agrees_across_ranks(pool):
    first, second = pool.run(in_model_worker)
    assert first["times"] == second["times"]  # MAX over ranks: one table
    assert set(first["times"]) == {"adaptive", "r=0 d=1 flat", "r=1 d=1 flat", "r=1 d=2 flat"}
    assert all(len(t) == 6 for t in first["times"].values())
    assert first["stationary"]["best_static"] in first["times"]
    assert first["exploration"]["steps"] == 6
    assert first["totals"]["adaptive_vs_best"] > 0
    # per round, per layer (plan, capacity, source); 32 tokens then 64 skewed ones: the capacity grows
    capacities = [[capacity for _, capacity, _ in layers] for layers in first["steps"]]
    assert len(capacities) == 6 and all(len(c) == 2 for c in capacities)
    assert max(capacities[0]) <= 16 < max(capacities[-1]) <= 32  # cf = -2: at most 2 T k / E


def tune_worker(out: str) -> dict:
    from flexmoe.app.tune import parse_args, tune

    args = parse_args(["--model-dim", "16", "--hidden-dim", "32", "--tokens", "64", "--out", out])
    return tune(args, dist.get_rank(), torch.device("cpu"))


@pytest.mark.timeout(240)
def test_flexmoe_tune_writes_a_plan_file_a_layer_starts_from(pool, tmp_path):
    out = tmp_path / "plans.json"
    first, second = pool.run(tune_worker, str(out))
    assert first["settled"] and first["steps"] == second["steps"]
    results = pool.run(plan_file_worker, str(out))
    assert all(EXPLORE not in r for r in results)


def plan_file_worker(path: str) -> list[str]:
    layer = MoELayer(16, 32, 4, top_k=2, seed=0, plan_table=path)
    sources = []
    for step in range(6):
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(step))
        layer(x).square().mean().backward()
        sources.append(layer.last_plan.source)
    return sources


def calibration_worker() -> dict:
    from dataclasses import asdict

    from flexmoe.bench.dist import calibrate
    from flexmoe.parallel.comm import ExpertGroups

    cluster = calibrate(ExpertGroups(None, shards_per_expert=1), threads=1)
    # a layer built on the calibrated figures passes the construction agreement on every rank
    MoELayer(16, 32, 2, seed=1, cluster=cluster)
    return asdict(cluster)


@pytest.mark.timeout(240)
def test_the_benchmark_calibration_is_the_same_on_every_rank(pool):
    # each rank timing its own GEMMs gave each a different cluster, which the layers' construction
    # agreement refuses: `flexmoe bench dist` could not run on two ranks
    first, second = pool.run(calibration_worker)
    assert first == second
