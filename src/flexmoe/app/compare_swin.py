"""`flexmoe compare swin`: SwinV2-MoE-tiny against its dense twin swinv2_tiny on MNIST-5k.

The twin has the same active parameters per token: SwinV2-MoE-tiny routes each token to one expert
(top-1) as wide as the dense MLP it replaces, so only the routers are extra. Both train with
`flexmoe train`'s loop (app/train.py) and settings, on the same split, batches and schedule per seed
(the seed also draws the split). Measured: held-out accuracy and loss, and, on frozen features, a
few-shot linear probe on another data set: scikit-learn's 8x8 digits, drawn to MNIST's 20x20 box in
28x28 and normalised with MNIST's statistics; `shots` images per class train a logistic regression,
the rest test it, averaged over `draws` draws (the same draws for every model), next to the same
probe on the raw pixels.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flexmoe.app import cli_args
from flexmoe.app.compare import Metric, add_compare_options, parameter_counts, report, run_all
from flexmoe.app.data import load_digits, load_split, split_indices
from flexmoe.app.inference import load_trained_model
from flexmoe.app.train import TrainConfig, train
from flexmoe.models import SwinV2Config, model_config

MODELS = {"moe": "swinv2_moe_tiny", "dense": "swinv2_tiny"}
METRICS = (
    Metric(name="val_accuracy", lower_is_better=False),
    Metric(name="val_loss", lower_is_better=True),
    Metric(name="probe_accuracy", lower_is_better=False),
)


@dataclass(frozen=True, kw_only=True)
class SwinCompareConfig:
    """The defaults: 3 seeds of both models in about 6 minutes on 2 cores (README)."""

    seeds: int = 3
    jobs: int = 2
    out: str = "runs/compare/swin"
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    limit: int | None = None  # keep about this many MNIST images (quick runs)
    max_steps_per_epoch: int | None = None
    # model config fields: SwinV2 ones go to both models, MoE ones (num_experts, ...) to the MoE only
    overrides: dict = field(default_factory=dict)
    probe_shots: int = 5
    probe_draws: int = 20
    probe_limit: int | None = None  # probe on about this many digits (quick runs); None: all 1,797

    def __post_init__(self) -> None:
        for name in ("seeds", "jobs", "epochs", "batch_size", "probe_shots", "probe_draws"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.probe_limit is not None and self.probe_limit < 20 * self.probe_shots:
            raise ValueError(
                f"probe_limit must leave as many test digits as shots: >= {20 * self.probe_shots}, "
                f"got {self.probe_limit}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")

    def train_config(self, model: str, seed: int, run_dir: str) -> TrainConfig:
        """`flexmoe train`'s settings for one run: its defaults but for the ones set here."""
        dense_fields = {f.name for f in dataclasses.fields(SwinV2Config)}
        overrides = {k: v for k, v in self.overrides.items() if model == "moe" or k in dense_fields}
        return TrainConfig(
            model=MODELS[model],
            data="mnist_5k",
            limit=self.limit,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=seed,
            max_steps_per_epoch=self.max_steps_per_epoch,
            out_dir=run_dir,
            model_overrides=overrides,
        )


# ----------------------------------------------------------------------------------- the probe data


def probe_images(
    mean: tuple[float, ...], std: tuple[float, ...], *, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as MNIST-like images [N, 1, 28, 28] (normalised as the training images
    were) and their labels; all 1,797, or a seeded stratified subset of about `limit`."""
    digits = load_digits()
    if limit is not None and limit < len(digits):
        keep, _ = split_indices(digits.labels, test_fraction=1 - limit / len(digits), seed=0)
        digits = digits.subset(keep.sort().values)
    box = F.interpolate(digits.images, size=(20, 20), mode="bilinear", align_corners=False)
    images = F.pad(box, (4, 4, 4, 4))  # MNIST digits sit in a 20x20 box centred in 28x28
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images - m) / s, digits.labels


@torch.no_grad()
def features(model: torch.nn.Module, images: torch.Tensor, *, batch: int = 256) -> torch.Tensor:
    """The pooled features before the classifier head, [N, C]."""
    model.eval()
    return torch.cat([model.forward_features(images[i : i + batch]) for i in range(0, len(images), batch)])


def shot_draws(labels: torch.Tensor, *, shots: int, draws: int) -> list[torch.Tensor]:
    """`draws` index sets of `shots` images per class, the same for every model (seeded by the draw)."""
    sets = []
    for d in range(draws):
        g = torch.Generator().manual_seed(d)
        picks = []
        for c in torch.unique(labels).tolist():
            idx = torch.nonzero(labels == c).flatten()
            picks.append(idx[torch.randperm(len(idx), generator=g)[:shots]])
        sets.append(torch.cat(picks))
    return sets


def probe_accuracy(x: torch.Tensor, labels: torch.Tensor, *, shots: int, draws: int) -> float:
    """Mean held-out accuracy of a logistic regression on `shots` examples per class (standardised
    features), over `draws` draws; every other image tests it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_np, y_np = x.flatten(1).double().numpy(), labels.numpy()
    scores = []
    for train_idx in shot_draws(labels, shots=shots, draws=draws):
        test = np.ones(len(y_np), dtype=bool)
        test[train_idx.numpy()] = False
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        probe.fit(x_np[train_idx.numpy()], y_np[train_idx.numpy()])
        scores.append(probe.score(x_np[test], y_np[test]))
    return float(np.mean(scores))


# ------------------------------------------------------------------------------------------ the runs


def train_swin(config: SwinCompareConfig, model: str, seed: int, run_dir: str) -> dict:
    """One run of `compare swin` (in a worker process): the record `summarize` reads."""
    report = train(config.train_config(model, seed, run_dir))
    epochs = report["epochs"]
    steps_per_epoch = _steps_per_epoch(report, config.batch_size)
    trained, _ = load_trained_model(Path(run_dir) / "checkpoint", eval_capacity_factor=0.0, device="cpu")
    mean, std = _normalisation(config, seed)
    images, labels = probe_images(mean, std, limit=config.probe_limit)
    probe = probe_accuracy(
        features(trained, images), labels, shots=config.probe_shots, draws=config.probe_draws
    )
    return {
        "val_accuracy": epochs[-1]["test_accuracy"],
        "val_loss": epochs[-1]["test_loss"],
        "probe_accuracy": probe,
        "train_seconds": sum(e["seconds"] for e in epochs),
        "curve": {
            "step": [(e["epoch"] + 1) * steps_per_epoch for e in epochs],
            "seconds": np.cumsum([e["seconds"] for e in epochs]).tolist(),
            "val_accuracy": [e["test_accuracy"] for e in epochs],
            "val_loss": [e["test_loss"] for e in epochs],
            "train_loss": [e["train_loss"] for e in epochs],
        },
        **parameter_counts(trained),
    }


def _steps_per_epoch(report: dict, batch_size: int) -> int:
    e = report["epochs"][0]
    return round(e["images_per_s"] * e["seconds"] / batch_size)


def _normalisation(config: SwinCompareConfig, seed: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and std of this seed's training images (what the model was fed)."""
    return _train_stats(config.train_config("dense", seed, "").limit, seed)


@functools.lru_cache(maxsize=8)
def _train_stats(limit: int | None, seed: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    test_fraction = TrainConfig.test_fraction  # flexmoe train's split
    split = load_split("mnist_5k", test_fraction=test_fraction, seed=seed, limit=limit)
    return split.train.mean, split.train.std


def compare_swin(config: SwinCompareConfig) -> dict:
    started = time.perf_counter()
    out = Path(config.out)
    records = run_all(functools.partial(train_swin, config), seeds=config.seeds, jobs=config.jobs, out=out)
    images, labels = probe_images(*_normalisation(config, 0), limit=config.probe_limit)
    pixels = probe_accuracy(images, labels, shots=config.probe_shots, draws=config.probe_draws)
    settings = {
        **json.loads(json.dumps(dataclasses.asdict(config), default=str)),
        "models": MODELS,
        "train": dataclasses.asdict(config.train_config("moe", 0, "")) | {"seed": "per run", "out_dir": None},
        "probe": f"scikit-learn digits ({len(labels)}), {config.probe_shots} shots per class, "
        f"{config.probe_draws} draws, logistic regression on standardised features",
    }
    extra = {"probe_accuracy_raw_pixels": pixels}
    return report("swin", records, METRICS, settings=settings, out=out, started=started, extra=extra)


# ----------------------------------------------------------------------------------- command line


def build_parser() -> cli_args.ArgumentParser:
    d = SwinCompareConfig()
    a = cli_args
    p = a.ArgumentParser(
        prog="flexmoe compare swin",
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_compare_options(p, seeds=d.seeds, jobs=d.jobs, out=d.out)
    p.add_argument("--epochs", type=a.positive_int, default=d.epochs, help=f"(default: {d.epochs})")
    p.add_argument(
        "--batch-size", type=a.positive_int, default=d.batch_size, help=f"(default: {d.batch_size})"
    )
    p.add_argument("--lr", type=a.positive_float, default=d.lr, help=f"peak learning rate (default: {d.lr})")
    p.add_argument("--limit", type=a.positive_int, default=None, help="keep about this many images (>= 2)")
    p.add_argument("--max-steps-per-epoch", type=a.positive_int, default=None)
    p.add_argument(
        "--probe-shots", type=a.positive_int, default=d.probe_shots, help=f"(default: {d.probe_shots})"
    )
    p.add_argument(
        "--probe-draws", type=a.positive_int, default=d.probe_draws, help=f"(default: {d.probe_draws})"
    )
    p.add_argument(
        "--probe-limit",
        type=a.positive_int,
        default=None,
        help="probe on about this many digits (quick runs)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="a model config field for both models (SwinV2 fields) or the MoE only (MoE layer fields), "
        "e.g. --set embed_dim=16 --set num_experts=4",
    )
    return p


def _option(word: str, names: set[str]) -> str:
    return f"--{word.replace('_', '-')}" if word in names else word


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 2:
        parser.error(f"argument --limit: must be an integer >= 2, got {args.limit}")
    overrides = cli_args.parse_overrides(args.set)
    names = {f.name for f in dataclasses.fields(SwinCompareConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    try:
        config = SwinCompareConfig(**values, overrides=overrides)
    except ValueError as exc:  # its message names fields: say the options
        parser.error(re.sub(r"\b[a-z_]+\b", lambda m: _option(m.group(0), names), str(exc)))
    for model in MODELS:  # a field a model refuses is one line now, not an error in every run
        model_config(MODELS[model], **config.train_config(model, 0, "").model_overrides)
    return compare_swin(config)
