"""The benchmarks keep running (tiny workloads; the timings themselves are never asserted)."""

from __future__ import annotations

import json

import pytest

from flexmoe.bench.common import paired_ratio
from flexmoe.bench.layer import main as bench_layer
from flexmoe.bench.swin import main as bench_swin


def test_layer_benchmark_quick(tmp_path):
    out = str(tmp_path / "l.json")
    payload = bench_layer(["--quick", "--repeats", "1", "--warmup", "0", "--breakdown", "--out", out])
    saved = json.loads((tmp_path / "l.json").read_text())
    assert saved["environment"]["torch"] and len(saved["results"]) == len(payload["results"]) == 2
    first = saved["results"][0]
    for key in ("flexmoe_fb_s", "einsum_fb_s", "padded_fb_s", "gemm_floor_fb_s", "ffn_floor_fb_s"):
        assert first[key] > 0, key
    assert first["speedup_vs_einsum_fb"] > 0 and first["over_ffn_floor_fb"] > 0
    assert first["kept_rows"] <= first["tokens"] * first["top_k"]
    cut = first["breakdown_ms"]["flexmoe"]  # by kind of operator (flexmoe.bench.op_breakdown)
    assert cut["forward: gemm"] > 0 and cut["backward: gemm"] > 0 and cut["total"] > 0


def test_swin_benchmark_quick(tmp_path):
    payload = bench_swin(
        ["--quick", "--batch", "4", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "s.json")]
    )
    assert [r["implementation"] for r in payload["results"]] == ["flexmoe", "einsum"]
    assert payload["results"][0]["train_speedup"] > 0


@pytest.mark.parametrize("rounds", [6, 7, 8, 180])
def test_drift_phases_split_the_run_as_the_totals_do(rounds):
    from flexmoe.bench.dist import DRIFTING, drift_schedule
    from flexmoe.bench.in_model import Phase, summarize_totals

    phases = (Phase(), Phase(skew=1.0, tokens=64), Phase(tokens=8))
    schedule = drift_schedule(rounds, phases)
    times = {"adaptive": [float(phases.index(schedule(i))) for i in range(rounds)], "static": [1.0] * rounds}
    totals = summarize_totals({"times": times, "decisions": []}, phases=3)
    # every round of the k-th third reports phase k (its median is k)
    assert [m["adaptive"] for m in totals["phase_median_ms"]] == [0.0, 1000.0, 2000.0]
    assert all(len(d.phases) == 3 for d in DRIFTING)


def test_ranking_report_scores_the_refit_against_both_measurements():
    from flexmoe.bench.in_model import ranking_report
    from flexmoe.core.plans import Plan

    a, b, c, d = Plan(r=0), Plan(d=1), Plan(d=2), Plan(d=4)

    class Ranker:  # predicts a < b < c < d; d is no candidate of the tuner
        plans = [a, b, c]

        def predict(self, capacity, plan):
            return {a: 1.0, b: 2.0, c: 3.0, d: 4.0}[plan]

    layer = {a: 0.1, b: 0.3, c: 0.2, d: 0.4}  # b and c swapped
    model = {a.describe(): 10.0, b.describe(): 20.0, c.describe(): 30.0}  # d not run in the model
    report = ranking_report(Ranker(), 64, layer, model)
    assert report["spearman_refit"] == pytest.approx(0.5)  # over a, b, c
    assert report["spearman_refit_in_model"] == pytest.approx(1.0)
    assert report["spearman_layer_vs_model"] == pytest.approx(0.5)


def test_the_gemm_floor_times_its_second_back_to_back_run_only():
    from flexmoe.bench.common import interleaved_times
    from flexmoe.bench.hf import SecondRunTimed

    calls = []
    floor = SecondRunTimed(lambda: calls.append(len(calls)), "cpu")
    times = interleaved_times({"floor": floor}, warmup=1, repeats=3)
    assert len(calls) == 2 * 4  # every call of the step runs it twice
    assert len(floor.seconds) == 4 and len(times["floor"]) == 3
    # the outer time holds both runs, the recorded one only the second
    assert all(inner <= outer for inner, outer in zip(floor.seconds[-3:], times["floor"], strict=True))


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # per-round ratios 1, 2, 3 -> 2; the ratio of the medians (3 / 1) would say 3
    assert paired_ratio([1.0, 10.0, 3.0], [1.0, 5.0, 1.0]) == 2.0
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], [1.0])


def test_layer_benchmark_reports_working_memory_under_autocast(tmp_path):
    out = str(tmp_path / "m.json")
    args = ["--quick", "--repeats", "1", "--warmup", "0", "--only", "0", "--out", out]
    first = bench_layer([*args, "--autocast", "bfloat16"])["results"][0]
    for key in ("flexmoe_wm_mb", "einsum_wm_mb", "fp32_gflops", "bf16_gflops", "flexmoe_fb_s"):
        assert first[key] > 0, key
    assert first["wm_saving_vs_einsum"] < 1
    memory = bench_layer(["--quick", "--memory", "--out", out])["results"][0]
    assert memory["flexmoe_wm_mb"] > 0 and memory["einsum_wm_mb"] > 0
    with pytest.raises(ValueError, match="--autocast"):
        bench_layer([*args, "--autocast", "bfloat16", "--dtype", "bfloat16"])
