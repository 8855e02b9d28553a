"""The `flexmoe lm` example: corpus, configuration, and a few training steps on 2 gloo ranks."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from flexmoe.lm.data import ByteCorpus  # noqa: E402
from flexmoe.lm.train import LMConfig, parse_args, train  # noqa: E402
from flexmoe.testing.distributed import DistributedPool  # noqa: E402

TINY = dict(
    steps=8,
    batch_size=4,
    seq_len=32,
    hidden_size=32,
    heads=2,
    experts=4,
    top_k=2,
    moe_intermediate_size=16,
    eval_every=4,
    eval_windows=4,
    max_bytes=100_000,
    progress=False,
)


def test_corpus_splits_files_and_the_unigram_baseline_is_an_entropy():
    corpus = ByteCorpus.from_stdlib(max_bytes=50_000)
    assert corpus.train.numel() == 50_000 and 0 < corpus.held_out.numel() <= 5_000
    assert 1.0 < corpus.unigram_loss() < math.log(256)
    a = corpus.windows("train", 3, 16, torch.Generator().manual_seed(0))
    b = corpus.windows("train", 3, 16, torch.Generator().manual_seed(0))
    assert a.shape == (3, 16) and a.dtype == torch.long and torch.equal(a, b)
    with pytest.raises(ValueError, match="needs more than"):
        corpus.windows("held_out", 1, 10**6, torch.Generator())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(steps=0), "steps"),
        (dict(lr=0.0), "lr"),
        (dict(top_k=9), "top_k"),
        (dict(heads=3), "heads"),
        (dict(max_bytes=10), "max_bytes"),
    ],
)
def test_config_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LMConfig(**kwargs)


def test_command_line_errors_exit_with_the_reason(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--top-k", "20"])
    assert exit_info.value.code == 2 and "--top-k=20 must not exceed --experts=8" in capsys.readouterr().err
    assert parse_args(["--steps", "5", "--no-progress"]) == LMConfig(steps=5, progress=False)


def lm_worker(out_dir: str) -> dict:
    return train(LMConfig(out_dir=out_dir, **TINY))


@pytest.mark.timeout(240)
def test_two_rank_training_learns_and_writes_its_report(tmp_path):
    with DistributedPool(2, collective_timeout_s=60.0, timeout_s=200.0) as pool:
        per_rank = pool.run(lm_worker, str(tmp_path))
    first, second = per_rank
    assert first["final_held_out_loss"] == second["final_held_out_loss"]
    losses = [h["loss"] for h in first["steps"]]
    assert len(losses) == 8 and losses[-1] < losses[0]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["world_size"] == 2 and len(saved["tuner"]) == 2 and saved["evals"][-1]["step"] == 8


def lm_fsdp_worker(out_dir: str) -> list[float]:
    """The same steps under DDP and under FSDP2: (DDP's, FSDP2's) training losses."""
    ddp = train(LMConfig(out_dir=f"{out_dir}/ddp", **TINY))
    fsdp = train(LMConfig(out_dir=f"{out_dir}/fsdp", fsdp=True, **TINY))
    return [h["loss"] for h in ddp["steps"]], [h["loss"] for h in fsdp["steps"]]


@pytest.mark.timeout(240)
def test_fsdp_training_matches_ddp(tmp_path):
    with DistributedPool(2, collective_timeout_s=60.0, timeout_s=200.0) as pool:
        (ddp, fsdp), _ = pool.run(lm_fsdp_worker, str(tmp_path))
    assert fsdp == pytest.approx(ddp, abs=1e-4)
    assert parse_args(["--fsdp"]).fsdp and not parse_args([]).fsdp


def lm_hf_ep_worker(out_dir: str) -> dict:
    return train(LMConfig(out_dir=out_dir, hf_ep=True, **TINY))


@pytest.mark.timeout(240)
def test_training_through_transformers_distributed_config(tmp_path):
    """--hf-ep: transformers' EP + FSDP2, the tokens exchanged by flexmoe's EP implementation."""
    with DistributedPool(2, collective_timeout_s=60.0, timeout_s=200.0) as pool:
        first, second = pool.run(lm_hf_ep_worker, str(tmp_path))
    assert first["final_held_out_loss"] == second["final_held_out_loss"]
    losses = [h["loss"] for h in first["steps"]]
    assert losses[-1] < losses[0]
    assert len(first["tuner"]) == 2 and all(t["last_plan"] is not None for t in first["tuner"])
    with pytest.raises(ValueError, match="exclusive"):
        LMConfig(fsdp=True, hf_ep=True)
    with pytest.raises(ValueError, match="torch.distributed"):
        train(LMConfig(out_dir=str(tmp_path / "one"), hf_ep=True, **TINY))


def test_launcher_rejects_a_bad_process_count(capsys):
    from flexmoe.lm import main as launch

    with pytest.raises(SystemExit) as exit_info:
        launch(["--nproc", "0"])
    assert exit_info.value.code == 2 and "argument --nproc" in capsys.readouterr().err
