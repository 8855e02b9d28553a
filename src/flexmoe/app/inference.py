"""`flexmoe eval` and `flexmoe predict`: a trained checkpoint on held-out data or on new images.

The model is rebuilt from the configuration stored in the checkpoint, on any number of processes
(the expert shards are re-sliced to the loading world size). Inference uses its own capacity factor:
0 (dropless, the default here) makes every image's prediction independent of the batch it came in.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from flexmoe.app.cli_args import ArgumentParser, finite_float, positive_int
from flexmoe.app.data import load_images, load_split
from flexmoe.app.launch import init_distributed
from flexmoe.app.train import evaluate
from flexmoe.checkpoint import load_checkpoint, read_extra
from flexmoe.models import create_model


def load_trained_model(checkpoint: str | Path, *, eval_capacity_factor: float | None, device) -> tuple:
    """(model in eval mode, the training config dict) from a checkpoint directory."""
    extra = read_extra(checkpoint)
    config = extra["config"]
    overrides = dict(extra.get("model_shape", {}), **config.get("model_overrides", {}))
    if eval_capacity_factor is not None and "moe" in config["model"]:
        overrides["eval_capacity_factor"] = eval_capacity_factor
    model = create_model(config["model"], **overrides).to(device)
    load_checkpoint(checkpoint, model)
    return model.eval(), config


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory written by flexmoe train")
    parser.add_argument(
        "--eval-capacity-factor",
        type=finite_float,
        default=0.0,
        help="MoE capacity factor at inference (0 = dropless)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=256)


def eval_main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(prog="flexmoe eval", description=__doc__)
    _common(parser)
    parser.add_argument("--data", default=None, help="default: the data set the checkpoint was trained on")
    args = parser.parse_args(argv)
    rank, world, device = init_distributed()
    model, config = load_trained_model(
        args.checkpoint, eval_capacity_factor=args.eval_capacity_factor, device=device
    )
    split = load_split(
        args.data or config["data"],
        test_fraction=config["test_fraction"],
        seed=config["seed"],
        limit=config.get("limit"),
    )
    accuracy, loss = evaluate(model, split, batch=args.batch_size, rank=rank, world=world, device=device)
    if rank == 0:
        print(
            f"test_accuracy={accuracy:.4f} test_loss={loss:.4f} images={len(split.test)} world_size={world}"
        )
    if dist.is_initialized():
        dist.destroy_process_group()
    return {"test_accuracy": accuracy, "test_loss": loss}


def predict_main(argv: list[str] | None = None) -> list[int]:
    parser = ArgumentParser(prog="flexmoe predict", description=__doc__)
    _common(parser)
    parser.add_argument(
        "images",
        help="an image file, a folder of images (searched recursively), or an .npz with `images` "
        "(labels optional); prints one line per image: its name, the class index and the class name",
    )
    args = parser.parse_args(argv)
    _, _, device = init_distributed()
    model, config = load_trained_model(
        args.checkpoint, eval_capacity_factor=args.eval_capacity_factor, device=device
    )
    train = load_split(
        config["data"], test_fraction=config["test_fraction"], seed=config["seed"], limit=config.get("limit")
    ).train
    images, names = load_images(args.images, image_shape=train.image_shape)
    mean = torch.tensor(train.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(train.std, dtype=torch.float32).view(1, -1, 1, 1)
    images = (images - mean) / std  # the training statistics
    predictions = []
    with torch.no_grad():
        for start in range(0, len(images), args.batch_size):
            logits = model(images[start : start + args.batch_size].to(device))
            predictions += logits.argmax(-1).tolist()
    if not dist.is_initialized() or dist.get_rank() == 0:
        classes = train.class_names or tuple(str(i) for i in range(train.num_classes))
        for name, p in zip(names, predictions, strict=True):
            print(f"{name}\t{p}\t{classes[p]}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return predictions


main = eval_main
