"""The `flexmoe` command under bad input: one line on stderr naming the option, exit code 2; a real
checkpoint for eval/predict/resume (trained here for one step); `--debug` keeps the traceback.

Everything runs in this process through `flexmoe.cli.main(argv)` (no subprocess imports torch again),
or `flexmoe.cli.execute(argv)` where the command's result is checked.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch.distributed.run

from flexmoe import cli
from flexmoe.app.demo import DEMO_ARGS
from flexmoe.checkpoint import expert_file

TINY = ["--set", "embed_dim=16", "--set", "num_heads=[1,2,4,8]", "--set", "num_experts=4"]
TRAIN = ["--limit", "120", "--epochs", "2", "--batch-size", "16", "--max-steps-per-epoch", "1", *TINY]


def _user_error(capsys, argv: list[str]) -> str:
    """Run the command, expect exit code 2, return its one line of stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "argv, option",
    [
        (["plan", "--world-sizes", "0"], "--world-sizes"),
        (["plan", "--world-sizes", "16,abc"], "--world-sizes"),
        (["plan", "--experts", "0"], "--experts"),
        (["plan", "--model-dim", "0"], "--model-dim"),
        (["plan", "--tokens", "0"], "--tokens"),
        (["plan", "--top-k", "0"], "--top-k"),
        (["plan", "--top-k", "65", "--experts", "64"], "--top-k"),
        (["plan", "--capacity-factor", "0"], "--capacity-factor"),
        (["eval", "--checkpoint", "x", "--batch-size", "-5"], "--batch-size"),
        (["eval", "--checkpoint", "x", "--batch-size", "0"], "--batch-size"),
        (["eval", "--checkpoint", "x", "--eval-capacity-factor", "nan"], "--eval-capacity-factor"),
        (["predict", "--checkpoint", "x", "--batch-size", "0", "img.png"], "--batch-size"),
        (["train", "--stop-after", "0"], "--stop-after"),
        (["train", "--max-steps-per-epoch", "0"], "--max-steps-per-epoch"),
        (["train", "--grad-clip", "-1"], "--grad-clip"),
        (["train", "--label-smoothing", "2"], "--label-smoothing"),
        (["train", "--lr", "0"], "--lr"),
        (["train", "--limit", "1"], "--limit"),
        (["train", "--test-fraction", "1"], "--test-fraction"),
        (["demo", "--nproc", "0"], "--nproc"),
        (["demo", "--epochs", "0"], "--epochs"),
        (["demo", "--model", "nonsense"], "--model"),
        (["lm", "--steps", "0"], "--steps"),
        (["lm", "--steps", "abc"], "--steps"),
        (["lm", "--bogus", "1"], "--bogus"),
        (["lm", "--nproc", "0"], "--nproc"),
        (["lm", "--nproc=0"], "--nproc"),
        (["lm", "--nproc", "3"], "--nproc"),  # 8 experts do not split over 3 ranks
        (["lm", "--top-k", "9"], "--top-k"),
        (["lm", "--heads", "3"], "--heads"),
        (["tune", "--top-k", "0"], "--top-k"),
        (["tune", "--explore-budget", "2"], "--explore-budget"),
        (["bench"], "benchmark"),
        (["bench", "nonsense"], "benchmark"),
        (["bench", "layer", "--repeats", "0"], "--repeats"),
        (["bench", "layer", "--only", "99"], "--only"),
        (["bench", "swin", "--batch", "x"], "--batch"),
        (["bench", "hf", "--plan", "1"], "--plan"),
        (["bench", "hf", "--plan", "1,1,ring"], "--plan"),
        (["bench", "hf", "--plan", "1,x"], "--plan"),
        (["bench", "hf", "--adamw", "slow"], "--adamw"),
        (["bench", "dist", "--rounds", "x"], "--rounds"),
        (["bench", "dist"], "run under torchrun"),
        (["nonsense"], "command"),
    ],
)
def test_bad_option_values_are_one_line_errors(capsys, monkeypatch, argv, option):
    monkeypatch.setattr(torch.distributed.run, "main", _no_launch)
    assert option in _user_error(capsys, argv)


def _no_launch(args: list[str]) -> None:
    raise AssertionError(f"torchrun started with {args}, but the options were wrong")


LM = ["-m", "flexmoe.lm.train"]


@pytest.mark.parametrize(
    "argv, launched",
    [
        (
            ["lm", "--steps", "5", "--nproc", "1", "--no-progress"],
            ["--nproc-per-node=1", *LM, "--steps", "5", "--no-progress"],
        ),
        (["lm", "--nproc=4", "--seed", "1"], ["--nproc-per-node=4", *LM, "--seed", "1"]),
        (
            ["demo", "--limit", "100"],
            ["--nproc-per-node=2", "-m", "flexmoe.cli", "train", *DEMO_ARGS, "--limit", "100"],
        ),
    ],
)
def test_launchers_pass_the_checked_options_to_torchrun(monkeypatch, argv, launched):
    calls = []
    monkeypatch.setattr(torch.distributed.run, "main", calls.append)
    cli.main(argv)
    assert calls == [["--standalone", *launched]]


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_lm_help_lists_every_training_option_and_nproc(capsys):
    from dataclasses import fields

    from flexmoe.lm.train import LMConfig

    text = _help(capsys, ["lm"])
    options = [f"--{f.name.replace('_', '-')}" for f in fields(LMConfig) if f.name != "progress"]
    assert [o for o in [*options, "--no-progress", "--nproc"] if o not in text] == []


def test_bench_help_lists_the_benchmarks(capsys):
    text = _help(capsys, ["bench"])
    assert all(f"  {name} " in text for name in cli.BENCHMARKS)


HELP_PAGES = [
    [],
    *[[c] for c in cli.COMMANDS if c != "bench"],
    ["bench"],
    *[["bench", b] for b in cli.BENCHMARKS],
]


@pytest.mark.parametrize("argv", HELP_PAGES, ids=lambda argv: " ".join(argv) or "flexmoe")
def test_help_pages_name_no_internal_issue_numbers(capsys, argv):
    if argv[-1:] == ["hf"]:
        pytest.importorskip("transformers")
    assert not re.search(r"\bissues?\b", _help(capsys, argv), re.IGNORECASE)


def test_plan_prints_a_legend_and_rounds_times_and_speedups(capsys):
    cli.main(["plan", "--world-sizes", "16,256", "--all"])
    out = capsys.readouterr().out
    legend = out[out.index("legend:") :]
    assert all(f"  {column} " in legend for column in ("W", "s", "capacity", "static_ms", "speedup"))
    rows = [line.split() for line in out.splitlines() if re.match(r"\s*(16|256)\s", line)]
    summary = [r for r in rows if len(r) == 10]  # W E s capacity best(3 words) best_ms static_ms speedup
    every = [r for r in rows if len(r) == 6]  # W plan(3 words) predicted_ms speedup
    assert len(summary) == 2 and len(every) > 10
    for r in summary:
        assert (
            re.fullmatch(r"\d+\.\d", r[7])
            and re.fullmatch(r"\d+\.\d", r[8])
            and re.fullmatch(r"\d+\.\d\d", r[9])
        )
    for r in every:
        assert re.fullmatch(r"\d+\.\d", r[4]) and re.fullmatch(r"\d+\.\d\d", r[5])


def test_missing_checkpoint_is_a_one_line_error(capsys, tmp_path):
    line = _user_error(capsys, ["eval", "--checkpoint", str(tmp_path / "none")])
    assert line.startswith("flexmoe eval: error: no flexmoe checkpoint at")


def test_the_console_script_returns_none_so_its_exit_code_is_0(capsys):
    assert cli.main(["plan", "--world-sizes", "16", "--experts", "16"]) is None
    assert "best" in capsys.readouterr().out


def test_debug_keeps_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", "eval", "--checkpoint", str(tmp_path / "none")])


# -- with a trained checkpoint ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    cli.main(["train", *TRAIN, "--stop-after", "1", "--out-dir", str(out), "--no-retain-cpu-memory"])
    return out


def test_eval_of_a_damaged_checkpoint_exits_2_naming_the_file(capsys, trained, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "checkpoint", ckpt)
    assert "test_accuracy" in cli.execute(["eval", "--checkpoint", str(ckpt), "--batch-size", "64"])
    capsys.readouterr()
    shard = ckpt / expert_file(0)
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 256] = bytes(b ^ 0xFF for b in data[middle : middle + 256])
    shard.write_bytes(bytes(data))
    line = _user_error(capsys, ["eval", "--checkpoint", str(ckpt)])
    assert "experts-00000.pt" in line and "corrupt flexmoe checkpoint" in line


@pytest.mark.parametrize("change", [["--limit", "160"], ["--batch-size", "8"]])
def test_resuming_with_another_data_split_or_batch_is_refused(capsys, trained, tmp_path, change):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    argv = ["train", *TRAIN, "--out-dir", str(out), "--resume", "--no-retain-cpu-memory"]
    i = argv.index(change[0])
    argv[i + 1] = change[1]
    line = _user_error(capsys, argv)
    assert f"--resume: {change[0]} " in line and "the checkpoint has" in line


def _model_input(trained) -> tuple[int, int, int]:
    from flexmoe.checkpoint import read_extra

    shape = read_extra(trained / "checkpoint")["model_shape"]
    return shape["in_chans"], shape["img_size"], shape["img_size"]


def test_predict_takes_an_npz_without_labels_a_file_and_a_folder(capsys, trained, tmp_path):
    from PIL import Image

    C, H, W = _model_input(trained)
    assert C == 1
    gen = np.random.default_rng(0)
    pixels = gen.integers(0, 256, size=(3, H, W), dtype=np.uint8)
    np.savez(tmp_path / "x.npz", images=pixels)  # no labels
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(folder / f"im{i}.png")
    ckpt = ["predict", "--checkpoint", str(trained / "checkpoint")]

    from_npz = cli.execute([*ckpt, str(tmp_path / "x.npz")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["x.npz[0]", "x.npz[1]", "x.npz[2]"]
    assert [int(line.split("\t")[1]) for line in lines] == from_npz

    assert cli.execute([*ckpt, str(folder / "im1.png")]) == from_npz[1:2]
    assert capsys.readouterr().out.startswith("im1.png\t")

    assert cli.execute([*ckpt, str(tmp_path / "imgs")]) == from_npz
    names = [line.split("\t")[0] for line in capsys.readouterr().out.strip().splitlines()]
    assert names == [f"sub/im{i}.png" for i in range(3)]

    line = _user_error(capsys, [*ckpt, str(tmp_path / "missing.png")])
    assert "no such image" in line


def test_bench_hf_plan_names_r_d_and_the_exchange():
    from flexmoe.app.cli_args import ArgumentParser
    from flexmoe.bench.hf import _layer_options

    parser = ArgumentParser(prog="test")
    assert _layer_options(parser, "adaptive") == {}
    assert _layer_options(parser, "1,2") == dict(parallelism=1, pipeline_degree=2, all_to_all="flat")
    assert _layer_options(parser, "1,1,dedup") == dict(parallelism=1, pipeline_degree=1, all_to_all="dedup")
