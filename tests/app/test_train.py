"""The trainer end to end on a few hundred MNIST images: report, resume, and world-size changes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from flexmoe.app.data import load_split
from flexmoe.app.inference import load_trained_model
from flexmoe.app.train import TrainConfig, evaluate, parse_args, train
from flexmoe.testing.distributed import DistributedPool

SMALL = dict(embed_dim=16, num_heads=[1, 2, 4, 8], num_experts=4)


def _config(out, **kw) -> TrainConfig:
    base = dict(
        limit=240,
        epochs=2,
        batch_size=16,
        max_steps_per_epoch=3,
        out_dir=str(out),
        model_overrides=SMALL,
        lr=1e-3,
    )
    return TrainConfig(**{**base, **kw})


@pytest.mark.timeout(300)
def test_report_and_exact_resume(tmp_path):
    full = train(_config(tmp_path / "full"))
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert metrics["test_accuracy"] == full["test_accuracy"]
    assert {"train_images_per_s", "tuner", "epochs", "final_plans", "exploration"} <= set(metrics)
    assert metrics["exploration"]["layers"] == 2 and "explore_fraction" in metrics["tuner"][0]["exploration"]
    assert len(metrics["tuner"]) == 2  # the tiny model's two MoE layers
    assert all((tmp_path / "full" / name).is_file() for name in ("curves.png", "expert_load.png"))
    assert (tmp_path / "full" / "checkpoint").is_dir()

    train(_config(tmp_path / "split", stop_after=1))
    resumed = train(_config(tmp_path / "split", resume=True))
    for a, b in zip(full["epochs"], resumed["epochs"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-6)


def test_cli_arguments_and_validation():
    cfg = parse_args(["--epochs", "3", "--set", "num_experts=4", "--set", 'gate="cosine"'])
    assert cfg.epochs == 3 and cfg.model_overrides == {"num_experts": 4, "gate": "cosine"}
    assert parse_args(["--plan-table", "plans.json"]).plan_table == "plans.json"
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown data set"):
        train(TrainConfig(data="no_such_data", out_dir="/tmp/unused"))


def train_and_evaluate_worker(out: str) -> dict:
    cfg = _config(out, epochs=1)
    train(cfg)
    model, config = load_trained_model(f"{out}/checkpoint", eval_capacity_factor=0.0, device="cpu")
    split = load_split(
        config["data"], test_fraction=config["test_fraction"], seed=config["seed"], limit=config["limit"]
    )
    accuracy, loss = evaluate(
        model, split, batch=64, rank=dist.get_rank(), world=dist.get_world_size(), device="cpu"
    )
    return {"accuracy": accuracy, "loss": loss, "layout": model.moe_layers()[0].layout.world_size}


@pytest.mark.timeout(300)
def test_trained_on_two_ranks_evaluates_the_same_on_one(tmp_path):
    with DistributedPool(2, timeout_s=240) as pool:
        results = pool.run(train_and_evaluate_worker, str(tmp_path))
    assert results[0] == results[1] and results[0]["layout"] == 2
    model, config = load_trained_model(tmp_path / "checkpoint", eval_capacity_factor=0.0, device="cpu")
    assert model.moe_layers()[0].layout.world_size == 1
    split = load_split(
        config["data"], test_fraction=config["test_fraction"], seed=config["seed"], limit=config["limit"]
    )
    accuracy, loss = evaluate(model, split, batch=64, rank=0, world=1, device="cpu")
    assert accuracy == results[0]["accuracy"]
    assert loss == pytest.approx(results[0]["loss"], abs=1e-5)


def fsdp_worker(out: str) -> dict:
    """The same run under DDP and under FSDP2, and the FSDP2 run again in two parts (resumed from
    its checkpoint, which holds FSDP2's shards whole)."""
    ddp = train(_config(f"{out}/ddp"))
    fsdp = train(_config(f"{out}/fsdp", fsdp=True))
    train(_config(f"{out}/split", fsdp=True, stop_after=1))
    resumed = train(_config(f"{out}/split", fsdp=True, resume=True))
    return {"ddp": ddp["epochs"], "fsdp": fsdp["epochs"], "resumed": resumed["epochs"]}


@pytest.mark.timeout(300)
def test_fsdp_trains_as_ddp_and_its_checkpoint_loads_anywhere(tmp_path):
    with DistributedPool(2, timeout_s=240) as pool:
        results = pool.run(fsdp_worker, str(tmp_path))
    for key in ("train_loss", "test_loss", "test_accuracy"):
        for run in ("fsdp", "resumed"):
            got = [e[key] for e in results[0][run]]
            assert got == pytest.approx([e[key] for e in results[0]["ddp"]], abs=1e-5), (run, key)
    # the FSDP2 checkpoint loads on one process (whole replicated tensors, re-sliced experts) as the
    # DDP one does
    fsdp, _ = load_trained_model(tmp_path / "fsdp" / "checkpoint", eval_capacity_factor=0.0, device="cpu")
    ddp, _ = load_trained_model(tmp_path / "ddp" / "checkpoint", eval_capacity_factor=0.0, device="cpu")
    want = ddp.state_dict()
    for name, value in fsdp.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=1e-5, msg=name)
    assert parse_args(["--fsdp"]).fsdp


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        train(replace(_config(tmp_path / "none"), resume=True))
