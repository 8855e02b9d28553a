"""Cost model, planner and tuner logic on one process."""

from __future__ import annotations

from flexmoe.cost_model import PRESETS, CostModel, LayerShape, candidate_plans
from flexmoe.planner import main as plan_main
from flexmoe.plans import Plan

A100 = CostModel(PRESETS["a100"])


def _shape(W, *, E=64, C=256, M=2048, H=8192, T=8192):
    return LayerShape(model_dim=M, hidden_dim=H, num_experts=E, world_size=W, capacity=C, tokens=T)


def test_candidate_plans_cover_every_valid_degree():
    plans = candidate_plans(_shape(16, E=4), two_dh=True)  # s = 4: r in {0, 1, 2, 4}
    assert {p.r for p in plans} == {0, 1, 2, 4}
    assert {p.d for p in plans if p.r} == {1, 2, 4, 8}
    assert {p.all_to_all for p in plans if p.r} == {"flat", "2dh"}
    assert [p for p in plans if p.r == 0] == [Plan(r=0)]


def test_2dh_wins_over_flat_when_messages_are_small_and_many():
    shape = _shape(2048, C=4, M=1024)
    flat = A100.step_time(shape, Plan(r=1, d=1, all_to_all="flat"))
    two_dh = A100.step_time(shape, Plan(r=1, d=1, all_to_all="2dh"))
    assert two_dh < flat
    small = _shape(16, C=4096)  # 2 nodes, huge messages: the layout transform is not worth it
    assert A100.step_time(small, Plan(all_to_all="flat")) <= A100.step_time(small, Plan(all_to_all="2dh"))


def test_pipelining_helps_when_compute_and_communication_are_comparable():
    shape = _shape(64, C=512)
    assert A100.step_time(shape, Plan(d=4)) < A100.step_time(shape, Plan(d=1))


def test_data_parallel_wins_with_few_tokens_and_small_experts_and_loses_with_large_ones():
    few_tokens = _shape(8, E=8, C=8, T=64, M=256, H=512)  # one node: gathering tiny experts is cheap
    assert A100.best(few_tokens)[0].r == 0
    big_experts = _shape(8, E=8, C=1024, T=8192, M=4096, H=16384)
    assert A100.best(big_experts)[0].r != 0


def test_planner_prints_every_world_size(capsys):
    payload = plan_main(["--world-sizes", "16,64,2048", "--experts", "64"])
    out = capsys.readouterr().out
    assert [s["W"] for s in payload["summary"]] == [16, 64, 2048]
    assert "best" in out and "speedup" in out
    w2048 = payload["summary"][-1]
    assert w2048["s"] == 32 and w2048["speedup"] >= 1.0
