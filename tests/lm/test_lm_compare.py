"""`flexmoe compare lm`: the MoE and its dense twin with tiny settings through the command line, in
this process (--jobs 1) and in two worker processes; the twin's active parameters; bad options."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from flexmoe import cli  # noqa: E402
from flexmoe.app.compare import parameter_counts  # noqa: E402
from flexmoe.lm.compare import LM_DEFAULTS  # noqa: E402
from flexmoe.lm.train import LMConfig, build_model  # noqa: E402

TINY = [
    "--steps", "6", "--eval-every", "3", "--batch-size", "4", "--seq-len", "32", "--hidden-size", "32",
    "--heads", "2", "--experts", "4", "--top-k", "2", "--moe-intermediate-size", "16",
    "--eval-windows", "4", "--max-bytes", "100000",
]  # fmt: skip
MODEL_KEYS = {"val_loss", "val_loss_mean", "val_loss_std", "val_loss_at_equal_time", "active_params"}
MODEL_KEYS |= {"total_params", "step_time_s", "train_seconds", "curves"}


@pytest.mark.parametrize("experts, top_k", [(8, 2), (16, 1), (4, 4)])
def test_the_dense_twin_has_the_moe_s_active_parameters(experts, top_k):
    from flexmoe.integrations.transformers import shard_experts

    config = LMConfig(experts=experts, top_k=top_k, hidden_size=64, moe_intermediate_size=32, heads=2)
    moe = parameter_counts(shard_experts(build_model(config)))
    dense = parameter_counts(build_model(config, dense=True))
    assert dense["active_params"] == dense["total_params"]
    assert moe["total_params"] > dense["total_params"] or experts == top_k
    assert abs(moe["active_params"] / dense["active_params"] - 1) < 0.05  # the routers only


def test_the_default_moe_holds_far_more_parameters_than_its_twin_at_equal_active_ones():
    """What `compare lm` tests by default: the experts, not the active parameters, differ."""
    from flexmoe.integrations.transformers import shard_experts

    config = LMConfig(**LM_DEFAULTS)
    moe = parameter_counts(shard_experts(build_model(config)))
    dense = parameter_counts(build_model(config, dense=True))
    assert abs(moe["active_params"] / dense["active_params"] - 1) < 0.05
    assert moe["total_params"] > 5 * dense["total_params"]


def _check_report(out, result: dict, seeds: int) -> None:
    saved = json.loads((out / "compare.json").read_text())
    assert saved["task"] == "lm" and saved["metric"] == "val_loss" and saved["lower_is_better"]
    assert saved["seeds"] == list(range(seeds)) and saved["unit"] == "nats per byte"
    for model in ("moe", "dense"):
        entry = saved[model]
        assert set(entry) >= MODEL_KEYS
        assert len(entry["val_loss"]) == seeds and all(0 < v < 6 for v in entry["val_loss"])
        assert [c["step"] for c in entry["curves"]] == [[3, 6]] * seeds
        assert all(len(c["train_loss"]) == 6 for c in entry["curves"]) and entry["step_time_s"] > 0
    assert saved["moe"]["total_params"] > saved["dense"]["total_params"]
    assert abs(saved["moe"]["active_params"] / saved["dense"]["active_params"] - 1) < 0.05
    assert saved["comparison"]["active_params_within_5_percent"]
    assert saved["settings"]["dense_intermediate_size"] == 2 * 16
    assert saved["settings"]["lm"]["steps"] == 6 and "seed" not in saved["settings"]["lm"]
    assert (out / "compare.png").is_file() and len(saved["load_average"]) == 3
    assert result["comparison"] == saved["comparison"]


@pytest.mark.timeout(240)
def test_compare_lm_writes_the_report_and_a_table(tmp_path, capsys):
    out = tmp_path / "lm"
    result = cli.execute(["compare", "lm", *TINY, "--seeds", "2", "--jobs", "1", "--out", str(out)])
    _check_report(out, result, seeds=2)
    printed = capsys.readouterr().out
    assert "val_loss at equal time" in printed and "pooled seed std" in printed and "load average" in printed
    # the same seed trains the same model on the same batches: the runs repeat exactly
    again = cli.execute(["compare", "lm", *TINY, "--seeds", "1", "--jobs", "1", "--out", str(tmp_path / "a")])
    assert again["moe"]["val_loss"] == result["moe"]["val_loss"][:1]
    assert again["dense"]["val_loss"] == result["dense"]["val_loss"][:1]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_compare_lm_in_two_processes_gives_the_same_losses(tmp_path):
    here = cli.execute(["compare", "lm", *TINY, "--seeds", "1", "--jobs", "1", "--out", str(tmp_path / "a")])
    out = tmp_path / "b"
    apart = cli.execute(["compare", "lm", *TINY, "--seeds", "1", "--jobs", "2", "--out", str(out)])
    _check_report(out, apart, seeds=1)
    for model in ("moe", "dense"):
        assert apart[model]["val_loss"] == pytest.approx(here[model]["val_loss"], rel=1e-4)


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--seeds", "0"], "--seeds"),
        (["--jobs", "0"], "--jobs"),
        (["--steps", "0"], "--steps"),
        (["--experts", "4", "--top-k", "5"], "--top-k"),
        (["--heads", "3"], "--heads"),
        (["--seed", "1"], "--seed"),  # the seeds are 0..N-1
    ],
)
def test_bad_options_are_one_line_errors(capsys, tmp_path, argv, option):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", "lm", *argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and option in err, err
    assert not (tmp_path / "runs").exists()
