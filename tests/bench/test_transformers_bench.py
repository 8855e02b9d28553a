"""`flexmoe bench hf` keeps running (a tiny model; timings are never asserted)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from flexmoe.bench.hf import main as bench_hf  # noqa: E402


def test_hf_benchmark_quick(tmp_path):
    out = tmp_path / "hf.json"
    args = [
        "--quick",
        "--batch",
        "2",
        "--seq",
        "8",
        "--dtypes",
        "fp32",
        "--backends",
        "flexmoe,eager,grouped_mm",
    ]
    payload = bench_hf([*args, "--repeats", "1", "--warmup", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["backend"] for r in saved["results"]] == ["flexmoe", "eager", "grouped_mm", "gemm floor"]
    *backends, floor = payload["results"]
    assert floor["experts_ms"] > 0
    for row in backends:
        assert row["step_ms"] > 0 and row["experts_ms"] > 0 and row["flexmoe_step_speedup"] > 0
        assert row["experts_over_gemm_floor"] > 0
        assert row["step_speedup_bound"] is None or row["step_speedup_bound"] > 0
    with pytest.raises(SystemExit):
        bench_hf(["--quick", "--dtypes", "fp64"])
