"""Cost model, planner and tuner logic on one process."""

from __future__ import annotations

import pytest

from flexmoe.app.plan import main as plan_main
from flexmoe.core.plans import Plan
from flexmoe.tuning.cost_model import (
    PRESETS,
    TERMS,
    CostModel,
    LayerShape,
    all_to_all_bytes,
    candidate_plans,
    expert_flops,
    gather_bytes,
    token_rows,
    with_node_size,
)

A100 = CostModel(PRESETS["a100"])


def _shape(W, *, E=64, C=256, M=2048, H=8192, T=8192):
    return LayerShape(model_dim=M, hidden_dim=H, num_experts=E, world_size=W, capacity=C, tokens=T)


def test_candidate_plans_cover_every_valid_degree():
    plans = candidate_plans(_shape(16, E=4), two_dh=True)  # s = 4: r in {0, 1, 2, 4}
    assert {p.r for p in plans} == {0, 1, 2, 4}
    assert {p.d for p in plans if p.r} == {1, 2, 4, 8}
    assert {p.all_to_all for p in plans if p.r} == {"flat", "2dh"}
    assert [p for p in plans if p.r == 0] == [Plan(r=0)]


def test_dedup_is_a_candidate_for_whole_experts_and_several_choices_only():
    dedup = Plan(r=1, d=1, all_to_all="dedup")
    assert dedup in candidate_plans(_shape(16, E=64), two_dh=True)
    assert dedup not in candidate_plans(_shape(16, E=4), two_dh=True)  # s = 4: experts split
    one_choice = LayerShape(
        model_dim=8, hidden_dim=8, num_experts=4, world_size=2, capacity=4, tokens=8, top_k=1
    )
    assert dedup not in candidate_plans(one_choice, two_dh=False)  # a token goes to one rank anyway
    with pytest.raises(ValueError, match="not pipelined"):
        Plan(r=1, d=2, all_to_all="dedup")


def test_token_rows_count_each_token_once_per_rank_holding_its_experts():
    def shape(W, k, T=1000):
        return LayerShape(
            model_dim=8, hidden_dim=8, num_experts=64, world_size=W, capacity=T, tokens=T, top_k=k
        )

    # k = 8 over W = 2 ranks: nearly every token goes to both ranks, 2 rows instead of 8
    assert token_rows(shape(2, 8)) == pytest.approx(2 * 1000 * (1 - 0.5**8))
    # k = 1: one row a token, as the per-assignment exchange
    assert token_rows(shape(8, 1)) == pytest.approx(1000)
    # many ranks: the k choices rarely share one, so it sends almost the k rows of the flat exchange
    assert token_rows(shape(2048, 2)) == pytest.approx(2 * 1000, rel=1e-3)


def test_dedup_wins_when_choices_share_ranks_and_not_when_they_spread():
    few_ranks = LayerShape(
        model_dim=2048, hidden_dim=1024, num_experts=64, world_size=8, capacity=256, tokens=2048, top_k=8
    )
    many_ranks = LayerShape(
        model_dim=2048, hidden_dim=1024, num_experts=2048, world_size=2048, capacity=8, tokens=4096, top_k=2
    )
    dedup, flat = Plan(r=1, d=1, all_to_all="dedup"), Plan(r=1, d=1, all_to_all="flat")
    assert A100.step_time(few_ranks, dedup) < A100.step_time(few_ranks, flat)
    assert A100.step_time(many_ranks, dedup) > A100.step_time(many_ranks, flat)


def test_2dh_wins_over_flat_when_messages_are_small_and_many():
    shape = _shape(2048, C=4, M=1024)
    flat = A100.step_time(shape, Plan(r=1, d=1, all_to_all="flat"))
    two_dh = A100.step_time(shape, Plan(r=1, d=1, all_to_all="2dh"))
    assert two_dh < flat
    small = _shape(16, C=4096)  # 2 nodes, huge messages: the layout transform is not worth it
    assert A100.step_time(small, Plan(all_to_all="flat")) <= A100.step_time(small, Plan(all_to_all="2dh"))


def test_the_node_size_of_the_process_groups_decides_what_2dh_costs():
    # the CPU preset's node of 64 ranks holds all of W = 4: a 2DH exchange is priced as the flat one
    cpu = PRESETS["cpu-gloo"]
    shape = _shape(4, E=4, C=64, M=64, H=128, T=128)
    flat, two_dh = Plan(all_to_all="flat"), Plan(all_to_all="2dh")
    assert CostModel(cpu).step_time(shape, two_dh) == CostModel(cpu).step_time(shape, flat)
    # on the layer's real nodes of 2, the 2DH's second phase and layout transform cost more than they
    # save on a link as fast inside a node as across (loopback)
    nodes_of_two = CostModel(with_node_size(cpu, 2))
    assert nodes_of_two.cluster.gpus_per_node == 2
    assert nodes_of_two.step_time(shape, two_dh) > nodes_of_two.step_time(shape, flat)
    assert with_node_size(cpu, None) is cpu


def test_pipelining_helps_when_compute_and_communication_are_comparable():
    shape = _shape(64, C=512)
    assert A100.step_time(shape, Plan(d=4)) < A100.step_time(shape, Plan(d=1))


def test_data_parallel_wins_with_few_tokens_and_small_experts_and_loses_with_large_ones():
    # one node, two small experts: gathering them beats four all-to-alls and per-call costs
    few_tokens = _shape(8, E=2, C=8, T=64, M=256, H=512)
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


def test_expert_flops_count_forward_and_backward_of_both_gemms_on_filled_rows():
    shape = LayerShape(model_dim=8, hidden_dim=16, num_experts=4, world_size=2, capacity=10, tokens=12)
    # R = min(T * k, E * C) = min(24, 40) = 24 rows; 2 GEMMs x (1 forward + 2 backward) x 2 FLOPs per MAC
    assert shape.filled_rows == 24
    assert expert_flops(shape) == 12 * 24 * 8 * 16
    swiglu = LayerShape(
        model_dim=8, hidden_dim=16, num_experts=4, world_size=2, capacity=10, tokens=12, swiglu=True
    )
    assert expert_flops(swiglu) == 18 * 24 * 8 * 16
    dropping = LayerShape(model_dim=8, hidden_dim=16, num_experts=4, world_size=2, capacity=3, tokens=12)
    assert dropping.filled_rows == 12  # E * C = 12 slots < 24 assignments


def test_bytes_moved_by_each_plan():
    shape = LayerShape(
        model_dim=8, hidden_dim=16, num_experts=2, world_size=4, capacity=5, tokens=6, bytes_per_element=4
    )
    # send buffer [E, r * C, M] in bytes, padding included
    assert all_to_all_bytes(shape, Plan(r=1)) == 2 * 1 * 5 * 8 * 4
    assert all_to_all_bytes(shape, Plan(r=2)) == 2 * 2 * 5 * 8 * 4
    # 1/W of all expert parameters: E * (2 M H + H + M) * b / W
    assert gather_bytes(shape, Plan(r=0)) == 2 * (2 * 8 * 16 + 16 + 8) * 4 / 4


@pytest.mark.parametrize("cluster", sorted(PRESETS))
def test_every_plan_costs_the_same_on_one_process(cluster):
    model = CostModel(PRESETS[cluster])
    shape = _shape(1, E=8, C=512, T=2048)
    times = {p: model.step_time(shape, p) for p in candidate_plans(_shape(8, E=8), two_dh=True)}
    assert len(set(times.values())) == 1


def test_terms_sum_to_the_step_time_and_overlap_only_hides():
    shape = _shape(64, C=512)
    for plan in candidate_plans(shape, two_dh=True):
        terms = A100.terms(shape, plan)
        assert set(terms) == set(TERMS)
        assert terms["overlap"] <= 0 <= min(terms[k] for k in TERMS if k != "overlap")
        assert sum(terms.values()) == pytest.approx(A100.step_time(shape, plan))
        if plan.d == 1:
            assert terms["overlap"] == 0
