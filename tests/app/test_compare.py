"""`flexmoe compare`: the shared report (parameter counts, seed statistics, table), the swin task
end to end with tiny settings, and bad options as one-line errors. Everything runs in this process
through `flexmoe.cli.execute` (--jobs 1); the lm task is in tests/lm/test_lm_compare.py."""

from __future__ import annotations

import json
import math

import pytest

from flexmoe import cli
from flexmoe.app.compare import parameter_counts, separation, spread, value_at
from flexmoe.models import create_model

SWIN_TINY = [
    "--limit", "120", "--epochs", "2", "--batch-size", "16", "--max-steps-per-epoch", "2",
    "--set", "embed_dim=16", "--set", "num_heads=[1,2,4,8]", "--set", "num_experts=4",
    "--probe-draws", "2", "--probe-limit", "200",
]  # fmt: skip
MODEL_KEYS = {"active_params", "total_params", "step_time_s", "train_seconds", "curves"}


def test_active_params_count_top_k_of_the_routed_experts():
    moe, dense = create_model("swinv2_moe_tiny"), create_model("swinv2_tiny")
    m, d = parameter_counts(moe), parameter_counts(dense)
    assert d["active_params"] == d["total_params"] == sum(p.numel() for p in dense.parameters())
    assert m["total_params"] > 2 * d["total_params"]  # 8 experts where the twin has one MLP
    # top-1 experts as wide as the dense MLP: only the routers are extra
    assert d["active_params"] < m["active_params"] < 1.05 * d["active_params"]


def test_separation_is_the_gap_in_pooled_seed_stds():
    s = separation([1.0, 1.2], [1.5, 1.5], lower_is_better=True)
    assert s["moe_better_by"] == pytest.approx(0.4)
    assert s["pooled_std"] == pytest.approx(math.sqrt(0.02 / 2))
    assert s["in_pooled_stds"] == pytest.approx(0.4 / math.sqrt(0.01))
    assert s["moe_better_by_over_2_pooled_std"] and s["seeds_moe_better"] == 2
    higher = separation([0.9, 0.9], [0.95, 0.95], lower_is_better=False)
    assert higher["moe_better_by"] == pytest.approx(-0.05) and higher["in_pooled_stds"] is None
    assert spread([2.0]) == {"mean": 2.0, "std": 0.0}
    assert value_at([1.0, 3.0], [10.0, 20.0], 2.0) == 15.0 and value_at([1.0, 3.0], [10.0, 20.0], 9.0) == 20.0


@pytest.mark.timeout(240)
def test_swin_compare_writes_the_report(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "swin"
    result = cli.execute(["compare", "swin", *SWIN_TINY, "--seeds", "2", "--jobs", "1", "--out", str(out)])
    saved = json.loads((out / "compare.json").read_text())
    assert saved["task"] == "swin" and saved["seeds"] == [0, 1] and saved["metric"] == "val_accuracy"
    for model in ("moe", "dense"):
        entry = saved[model]
        assert set(entry) >= MODEL_KEYS
        for metric in ("val_accuracy", "val_loss", "probe_accuracy"):
            assert len(entry[metric]) == 2 and f"{metric}_mean" in entry and f"{metric}_std" in entry
        assert all(0 <= a <= 1 for a in entry["val_accuracy"] + entry["probe_accuracy"])
        assert [c["step"] for c in entry["curves"]] == [[2, 4], [2, 4]]
    assert saved["moe"]["total_params"] > saved["dense"]["total_params"]
    assert saved["comparison"]["active_params_within_5_percent"]
    assert 0 < saved["probe_accuracy_raw_pixels"] <= 1
    assert (out / "compare.png").is_file() and saved["plot"] == str(out / "compare.png")
    assert (out / "runs" / "moe_seed1.log").is_file()
    assert result["comparison"] == saved["comparison"]
    printed = capsys.readouterr().out
    assert "probe_accuracy" in printed and "val_accuracy at equal time" in printed


def _user_error(capsys, argv: list[str]) -> str:
    """Run the command, expect exit code 2, return its one line of stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "argv, names",
    [
        (["compare"], "task"),
        (["compare", "nonsense"], "task"),
        (["compare", "swin", "--seeds", "0"], "--seeds"),
        (["compare", "swin", "--jobs", "x"], "--jobs"),
        (["compare", "swin", "--lr", "0"], "--lr"),
        (["compare", "swin", "--probe-shots", "0"], "--probe-shots"),
        (["compare", "swin", "--limit", "1"], "--limit"),
        (["compare", "swin", "--probe-limit", "50"], "--probe-limit"),
        (["compare", "swin", "--set", "bogus=1"], "bogus"),
        (["compare", "swin", "--bogus", "1"], "--bogus"),
    ],
)
def test_bad_options_are_one_line_errors(capsys, tmp_path, argv, names):
    assert names in _user_error(capsys, [*argv, "--out", str(tmp_path)] if len(argv) > 1 else argv)
    assert not (tmp_path / "runs").exists()  # refused before any run started
