"""Training report: metrics JSON (with the tuner's decisions) and plots, written by the first rank;
the environment record and the plain-text tables that every report and benchmark uses."""

from __future__ import annotations

import collections
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flexmoe.json_file import write_json


@dataclass(frozen=True, kw_only=True)
class EpochLog:
    epoch: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    images_per_s: float
    seconds: float
    expert_load: list  # per MoE layer: the share of assignments each expert received this epoch


def tuner_report(layers: list) -> list[dict]:
    """Per MoE layer: the plan of the last forward, the tuner's decisions and its trial table."""
    report = []
    for i, layer in enumerate(layers):
        tuner = getattr(layer, "tuner", None)
        report.append(
            {
                "layer": i,
                "last_plan": None if layer.last_plan is None else asdict(layer.last_plan),
                "decisions": [] if tuner is None else tuner.decisions,
                "trials": [] if tuner is None else tuner.table(),
                "exploration": None if tuner is None else tuner.summary(),
            }
        )
    return report


def exploration_summary(layers: list) -> dict:
    """Over all MoE layers: steps run on plans that were not chosen, against the steps and the budget."""
    summaries = [layer.tuner.summary() for layer in layers if getattr(layer, "tuner", None) is not None]
    steps = sum(s["steps"] for s in summaries)
    nonchosen = sum(s["explore_nonchosen_steps"] for s in summaries)
    return {
        "layers": len(summaries),
        "layer_steps": steps,
        "explore_steps": sum(s["explore_steps"] for s in summaries),
        "explore_nonchosen_steps": nonchosen,
        "explore_fraction": nonchosen / steps if steps else 0.0,
        "reexplorations": sum(s["reexplorations"] for s in summaries),
        "decisions": sum(
            d["event"] in ("decision", "predicted")
            for layer in layers
            if getattr(layer, "tuner", None)
            for d in layer.tuner.decisions
        ),
    }


def plot(out: Path, history: list[EpochLog]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h.epoch + 1 for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h.train_loss for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h.test_loss for h in history], "o-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [h.test_accuracy for h in history], "o-")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="held-out accuracy")
    fig.tight_layout()
    curves = out / "curves.png"
    fig.savefig(curves, dpi=100)
    plt.close(fig)
    files = [str(curves)]
    layers = len(history[-1].expert_load) if history else 0
    if layers:
        fig, axes = plt.subplots(1, layers, figsize=(4 * layers, 3.5), squeeze=False)
        for i, ax in enumerate(axes[0]):
            load = [h.expert_load[i] for h in history]
            image = ax.imshow(
                list(map(list, zip(*load, strict=True))),
                aspect="auto",
                cmap="viridis",
                extent=(0.5, len(load) + 0.5, len(load[0]) - 0.5, -0.5),
            )
            ax.set(xlabel="epoch", ylabel="expert", title=f"MoE layer {i}: share of tokens")
            fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = out / "expert_load.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(str(path))
    return files


def write_report(
    out: Path, *, config: dict, history: list[EpochLog], layers: list, world_size: int, write: bool
) -> dict:
    last = history[-1]
    plans_used = collections.Counter(
        f"r={lay.last_plan.r} d={lay.last_plan.d} {lay.last_plan.all_to_all}"
        for lay in layers
        if lay.last_plan
    )
    metrics = {
        "test_accuracy": last.test_accuracy,
        "train_images_per_s": sum(h.images_per_s for h in history) / len(history),
        "world_size": world_size,
        "epochs": [asdict(h) for h in history],
        "tuner": tuner_report(layers),
        "exploration": exploration_summary(layers),
        "final_plans": dict(plans_used),
        "config": config,
        "environment": environment(),
    }
    if write:
        out.mkdir(parents=True, exist_ok=True)
        metrics["plots"] = plot(out, history)
        write_json(out / "metrics.json", metrics)
    return metrics


# -- the environment record and plain-text tables of every report and benchmark ------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(**config) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    env.update(config)
    return env


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)
