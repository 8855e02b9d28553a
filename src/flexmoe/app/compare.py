"""What `flexmoe compare` reports: an MoE against its dense twin (the same active parameters per
token), both trained the same way from the same seeds. The runs live in flexmoe.lm.compare (`lm`)
and flexmoe.app.compare_swin (`swin`); this module holds what both report and how they run.

- `parameter_counts`: total and active parameters. Active = what one token's forward multiplies by:
  every parameter outside the routed experts counts whole (embeddings, attention, norms, routers,
  shared experts, the head), and each MoE layer's routed experts count top_k / E of theirs.
- `run_all`: the runs, one process per model at a time (`jobs` processes, the cores split among them),
  so both models' step times are measured under the same load; each run's output goes to a log file.
- `summarize`: per model the metric per seed, mean and sample std; the gap between the models in
  their pooled seed-to-seed std; quality at equal training time as well as at equal steps; writes
  compare.json and compare.png (curves, mean and a +-1 std band over the seeds). `report` also
  prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flexmoe.app.cli_args import positive_int
from flexmoe.app.reporting import environment, format_table
from flexmoe.core.experts import is_expert_param
from flexmoe.json_file import write_json
from flexmoe.layer import MoELayer

MODELS = ("moe", "dense")


@dataclass(frozen=True, kw_only=True)
class Metric:
    name: str  # the key of each run's record, e.g. "val_loss"
    lower_is_better: bool


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{"total_params", "active_params"} of a model held whole by one process (see the module doc)."""
    total = sum(p.numel() for p in model.parameters())
    idle = 0.0
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            routed = sum(p.numel() for p in layer.parameters() if is_expert_param(p))
            idle += routed * (1 - layer.config.top_k / layer.config.num_experts)
    return {"total_params": total, "active_params": round(total - idle)}


# ------------------------------------------------------------------------------------------ the runs


@dataclass(frozen=True, kw_only=True)
class Run:
    """One model trained from one seed: `train(model, seed, run_dir)` returns its record."""

    model: str  # "moe" | "dense"
    seed: int
    run_dir: str


def _print(line: str) -> None:
    print(line, flush=True)


def run_all(
    train: Callable[[str, int, str], dict],
    *,
    seeds: int,
    jobs: int,
    out: Path,
    log: Callable[[str], None] = _print,
) -> dict[str, list[dict]]:
    """Every (model, seed) run, in `jobs` processes (1: here); {"moe": [records], "dense": [...]}.

    `train` must be a module-level function (the processes import it). The runs alternate between the
    models, so with 2 processes the MoE and the dense twin mostly train side by side."""
    runs = [
        Run(model=m, seed=s, run_dir=str(out / "runs" / f"{m}_seed{s}")) for s in range(seeds) for m in MODELS
    ]
    log(f"{len(runs)} runs on {jobs} process(es); each run's log: {out / 'runs'}/<model>_seed<N>.log")
    records: dict[str, list[dict]] = {m: [] for m in MODELS}
    if jobs == 1:
        for run in runs:
            _finished(run, _logged(train, run), records, log)
        return records
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked thread pools
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_share_cores, initargs=(threads,)) as pool:
        futures = [(run, pool.submit(_logged, train, run)) for run in runs]
        try:
            for run, future in futures:
                _finished(run, future.result(), records, log)
        except BaseException:
            pool.shutdown(cancel_futures=True)  # one failed run: start no other
            raise
    return records


def add_compare_options(parser: argparse.ArgumentParser, *, seeds: int, jobs: int, out: str) -> None:
    """--seeds, --jobs and --out, with these defaults (every `flexmoe compare` task has them)."""
    parser.add_argument("--seeds", type=positive_int, default=seeds, help=f"seeds 0..N-1 (default: {seeds})")
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=jobs,
        help=f"processes training at once, sharing the cores; 1: in this process (default: {jobs})",
    )
    parser.add_argument(
        "--out", default=out, help=f"where compare.json, compare.png and runs/ go (default: {out})"
    )


def _share_cores(threads: int) -> None:
    """Each process its share of the cores: more threads than cores stall every step on a busy machine."""
    torch.set_num_threads(threads)


def _logged(train: Callable[[str, int, str], dict], run: Run) -> dict:
    """`train` with this process's output (prints, progress lines) in run_dir + ".log"."""
    path = Path(run.run_dir + ".log")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return {"seed": run.seed, **train(run.model, run.seed, run.run_dir)}


def _finished(run: Run, record: dict, records: dict[str, list[dict]], log: Callable[[str], None]) -> None:
    records[run.model].append(record)
    steps = record["curve"]["step"][-1]
    log(
        f"{run.model} seed {run.seed}: "
        + " ".join(f"{k}={record[k]:.4f}" for k in record if k.startswith(("val_", "probe_")))
        + f" ({record['train_seconds']:.0f} s training, {record['train_seconds'] / steps:.3f} s/step)"
    )


# -------------------------------------------------------------------------------------- the summary


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def separation(moe: Sequence[float], dense: Sequence[float], *, lower_is_better: bool) -> dict:
    """How far the MoE's seed mean beats the dense twin's (`moe_better_by` > 0: the MoE is better), in
    their pooled seed-to-seed std sqrt((s_moe^2 + s_dense^2) / 2), and per seed (same seed, same data)."""
    sign = -1.0 if lower_is_better else 1.0
    a, b = spread(moe), spread(dense)
    gap = sign * (a["mean"] - b["mean"])
    pooled = math.sqrt((a["std"] ** 2 + b["std"] ** 2) / 2)
    paired = [sign * (m - d) for m, d in zip(moe, dense, strict=True)]
    enough = len(moe) > 1 and pooled > 0
    return {
        "moe_better_by": gap,
        "pooled_std": pooled,
        "in_pooled_stds": gap / pooled if enough else None,
        "moe_better_by_over_2_pooled_std": gap > 2 * pooled if enough else None,
        "per_seed_moe_better_by": paired,
        "seeds_moe_better": sum(d > 0 for d in paired),
    }


def value_at(seconds: Sequence[float], values: Sequence[float], at: float) -> float:
    """A curve's value at `at` seconds of training, linear between its points (held past its ends)."""
    return float(np.interp(at, seconds, values))


def _model_entry(records: list[dict], metrics: Sequence[Metric], equal_time: Sequence[float]) -> dict:
    """One model's part of compare.json."""
    records = sorted(records, key=lambda r: r["seed"])
    head = metrics[0].name
    entry: dict = {}
    for m in metrics:
        values = [r[m.name] for r in records]
        entry[m.name] = values
        entry[f"{m.name}_mean"], entry[f"{m.name}_std"] = spread(values).values()
    entry[f"{head}_at_equal_time"] = [
        value_at(r["curve"]["seconds"], r["curve"][head], t) for r, t in zip(records, equal_time, strict=True)
    ]
    entry["active_params"] = records[0]["active_params"]
    entry["total_params"] = records[0]["total_params"]
    steps = [r["curve"]["step"][-1] for r in records]
    entry["train_seconds"] = [r["train_seconds"] for r in records]
    entry["step_time_s"] = sum(entry["train_seconds"]) / sum(steps)
    entry["curves"] = [{"seed": r["seed"], **r["curve"]} for r in records]
    return entry


def summarize(
    task: str,
    records: dict[str, list[dict]],
    metrics: Sequence[Metric],
    *,
    settings: dict,
    out: Path,
    seconds: float,
    extra: dict | None = None,
) -> dict:
    """compare.json's content (written with compare.png to `out`); metrics[0] is the headline."""
    by_seed = {m: sorted(records[m], key=lambda r: r["seed"]) for m in MODELS}
    # quality per second: each seed's curves read at the faster model's whole training time
    equal_time = [
        min(a["train_seconds"], b["train_seconds"])
        for a, b in zip(by_seed["moe"], by_seed["dense"], strict=True)
    ]
    result: dict = {
        "task": task,
        "metric": metrics[0].name,
        "lower_is_better": metrics[0].lower_is_better,
        "seeds": [r["seed"] for r in by_seed["moe"]],
    }
    for model in MODELS:
        result[model] = _model_entry(by_seed[model], metrics, equal_time)
    moe, dense = result["moe"], result["dense"]
    result["comparison"] = {
        m.name: separation(moe[m.name], dense[m.name], lower_is_better=m.lower_is_better) for m in metrics
    }
    head = f"{metrics[0].name}_at_equal_time"
    result["comparison"][head] = separation(
        moe[head], dense[head], lower_is_better=metrics[0].lower_is_better
    )
    ratio = moe["active_params"] / dense["active_params"]
    result["comparison"]["active_params_ratio"] = ratio
    result["comparison"]["active_params_within_5_percent"] = abs(ratio - 1) <= 0.05
    result["comparison"]["equal_time_s"] = equal_time
    result.update(extra or {})
    result["settings"] = settings
    result["seconds"] = seconds
    result["environment"] = environment()
    # other processes on the machine slow both models' steps: the 1, 5 and 15 minute load at the end
    result["load_average"] = list(os.getloadavg())
    out.mkdir(parents=True, exist_ok=True)
    result["plot"] = plot(out / "compare.png", result)
    write_json(out / "compare.json", result)
    return result


def report(
    task: str,
    records: dict[str, list[dict]],
    metrics: Sequence[Metric],
    *,
    settings: dict,
    out: Path,
    started: float,
    extra: dict | None = None,
) -> dict:
    """summarize (`started`: the comparison's time.perf_counter() at its start), print the table and
    where compare.json went; returns compare.json's content."""
    seconds = time.perf_counter() - started
    result = summarize(task, records, metrics, settings=settings, out=out, seconds=seconds, extra=extra)
    _print(table(result))
    _print(f"wrote {out / 'compare.json'} in {result['seconds']:.0f} s")
    return result


# ------------------------------------------------------------------------------------ table and plot


def table(result: dict) -> str:
    """Per model: parameters, each metric's mean +- std over the seeds (at equal steps), the headline
    metric at equal training time, and the step time."""
    head = result["metric"]
    metrics = [k.removesuffix("_mean") for k in result["moe"] if k.endswith("_mean")]
    rows = []
    for model in MODELS:
        e = result[model]
        row = {"model": model, "active params": e["active_params"], "total params": e["total_params"]}
        for m in metrics:
            row[m] = f"{e[f'{m}_mean']:.4f} ± {e[f'{m}_std']:.4f}"
        at = spread(e[f"{head}_at_equal_time"])
        row[f"{head} at equal time"] = f"{at['mean']:.4f} ± {at['std']:.4f}"
        row["step time s"] = e["step_time_s"]
        rows.append(row)
    lines = [format_table(rows, list(rows[0]))]
    for m in [*metrics, f"{head}_at_equal_time"]:
        s = result["comparison"][m]
        stds = "-" if s["in_pooled_stds"] is None else f"{s['in_pooled_stds']:.1f}"
        lines.append(
            f"{m}: MoE better by {s['moe_better_by']:+.4f} = {stds} pooled seed std "
            f"({s['pooled_std']:.4f}); MoE better on {s['seeds_moe_better']} of {len(result['seeds'])} seeds"
        )
    c = result["comparison"]
    lines.append(
        f"active params: MoE / dense = {c['active_params_ratio']:.4f}; equal time = the faster model's "
        f"training time per seed ({', '.join(f'{t:.0f}' for t in c['equal_time_s'])} s)"
    )
    if "probe_accuracy_raw_pixels" in result:
        lines.append(f"probe on the raw pixels: {result['probe_accuracy_raw_pixels']:.4f}")
    if "matmul_gflops" in result:
        fp32, bf16 = result["matmul_gflops"]["fp32_gflops"], result["matmul_gflops"]["bf16_gflops"]
        lines.append(f"matmul: fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s")
    if "load_average" in result:
        load = ", ".join(f"{v:.1f}" for v in result["load_average"])
        cores = result["environment"].get("cpu_count")
        lines.append(f"load average at the end (1, 5, 15 min): {load} on {cores} cores")
    return "\n".join(lines)


def plot(path: Path, result: dict) -> str | None:
    """The headline metric against steps and against training seconds (per model the seeds' mean and
    a +-1 std band), and the MoE's lead over the twin per seed and step (> 0: the MoE is better).
    None without matplotlib (the demo extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    head = result["metric"]
    ylabel = head.replace("_", " ") + (f" ({result['unit']})" if "unit" in result else "")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for model in MODELS:
        curves = result[model]["curves"]
        values = np.array([c[head] for c in curves])
        mean, std = values.mean(0), values.std(0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1])
        label = f"{model} ({result[model]['active_params']:,} active / {result[model]['total_params']:,})"
        for ax, key in zip(axes, ("step", "seconds"), strict=False):
            x = np.array([c[key] for c in curves]).mean(0)
            (line,) = ax.plot(x, mean, "o-", markersize=3, label=label)
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.25)
    for ax, xlabel in zip(axes, ("step", "training seconds (mean over seeds)"), strict=False):
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.legend()
    sign = -1.0 if result["lower_is_better"] else 1.0
    for moe, dense in zip(result["moe"]["curves"], result["dense"]["curves"], strict=True):
        lead = sign * (np.array(moe[head]) - np.array(dense[head]))
        axes[2].plot(moe["step"], lead, "o-", markersize=3, label=f"seed {moe['seed']}")
    axes[2].axhline(0.0, color="gray", linewidth=1)
    axes[2].set(
        xlabel="step", ylabel=f"MoE's lead in {head.replace('_', ' ')}", title="> 0: the MoE is better"
    )
    axes[2].legend()
    fig.suptitle(f"flexmoe compare {result['task']}: {len(result['seeds'])} seeds, mean ± 1 std")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
