"""`flexmoe compare lm|swin`: an MoE against its dense twin with the same active parameters per token,
trained the same way from the same seeds; prints a table and writes DIR/compare.json and
DIR/compare.png (the curves with seed bands).

lm: the byte-level Qwen3-MoE of `flexmoe lm` (experts run by flexmoe) against the same Qwen3-MoE class
with every MoE block replaced by a dense SwiGLU MLP of width top_k x expert width (Qwen3-MoE has no
shared expert); embeddings and attention identical. Both see the same windows in the same order, the
same steps, AdamW and schedule, per seed; the metric is the held-out loss in nats per byte.
swin: SwinV2-MoE-tiny against swinv2_tiny on MNIST-5k (flexmoe.app.compare_swin).
"""

# The command lives here, above flexmoe.app, because its lm part trains with flexmoe.lm.train.

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path

from flexmoe.app import cli_args
from flexmoe.app.compare import Metric, add_compare_options, parameter_counts, report, run_all
from flexmoe.bench.common import matmul_rates
from flexmoe.lm.data import ByteCorpus
from flexmoe.lm.train import LMConfig, add_config_options, build_model, config_from_args, dense_width, fit

# `flexmoe lm`'s model at half the width, 4x the batch and 4x the experts: 8M training bytes (about
# two passes over the corpus) for a dense twin of 107k parameters, while the MoE's experts hold 16x
# the twin's MLP parameters (848k in all) at the same active parameters. The MoE then leads by about
# 8 seed stds (README); with `flexmoe lm`'s own settings (8 experts, 2M bytes for 361k parameters) it
# led by about 1. 3 seeds of both take about 11 minutes on 2 idle cores (one process per model).
LM_DEFAULTS = dict(
    steps=1000,
    batch_size=64,
    hidden_size=64,
    experts=32,
    moe_intermediate_size=64,
    eval_every=100,
    eval_windows=1024,
)
LM_SKIPPED = ("seed", "out_dir", "progress", "fsdp", "hf_ep")  # per run, --out, to the log, one process
METRICS = (Metric(name="val_loss", lower_is_better=True),)


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """How many seeds (0, 1, ...), how many processes train at once, and where the report goes."""

    seeds: int = 3
    jobs: int = 2
    out: str = "runs/compare/lm"

    def __post_init__(self) -> None:
        for name in ("seeds", "jobs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def train_lm(config: LMConfig, model: str, seed: int, run_dir: str) -> dict:
    """One run of `compare lm` (in a worker process): the record `summarize` reads."""
    config = dataclasses.replace(config, seed=seed, out_dir=run_dir)
    corpus = ByteCorpus.from_stdlib(max_bytes=config.max_bytes)
    net = build_model(config, dense=model == "dense")
    if model == "moe":
        from flexmoe.integrations.transformers import shard_experts

        net = shard_experts(net)  # one process: every expert here, run by flexmoe's layer
    counts = parameter_counts(net)
    run = fit(net, corpus, config, label=f"{model} seed {seed}")
    evals = run["evals"]
    return {
        "val_loss": evals[-1]["held_out_loss"],
        "train_seconds": run["train_seconds"],
        "unigram_loss": corpus.unigram_loss(),
        "curve": {
            "step": [e["step"] for e in evals],
            "seconds": [e["train_seconds"] for e in evals],
            "val_loss": [e["held_out_loss"] for e in evals],
            "train_loss": [h["loss"] for h in run["steps"]],
        },
        **counts,
    }


def compare_lm(config: LMConfig, compare: CompareConfig) -> dict:
    started = time.perf_counter()
    out = Path(compare.out)
    records = run_all(functools.partial(train_lm, config), seeds=compare.seeds, jobs=compare.jobs, out=out)
    settings = {
        **dataclasses.asdict(compare),
        "lm": {k: v for k, v in dataclasses.asdict(config).items() if k not in LM_SKIPPED},
        "dense_intermediate_size": dense_width(config),
        "active_params": "all but the routed experts whole (embeddings, attention, norms, routers, head) "
        "+ top_k / E of the routed experts",
    }
    extra = {
        "unigram_loss": records["moe"][0]["unigram_loss"],
        "unit": "nats per byte",
        # beside the step times: the machines this runs on differ by 1000x in bf16
        "matmul_gflops": matmul_rates(),
    }
    return report("lm", records, METRICS, settings=settings, out=out, started=started, extra=extra)


def compare_config(args: argparse.Namespace) -> CompareConfig:
    return CompareConfig(seeds=args.seeds, jobs=args.jobs, out=args.out)


def lm_main(argv: list[str]) -> dict:
    parser = cli_args.ArgumentParser(
        prog="flexmoe compare lm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.allow_abbrev = False  # "--seed 1" (an option of `flexmoe lm`) must not read as --seeds 1
    d = CompareConfig()
    add_compare_options(parser, seeds=d.seeds, jobs=d.jobs, out=d.out)
    add_config_options(parser, skip=LM_SKIPPED, defaults=LM_DEFAULTS)
    args = parser.parse_args(argv)
    return compare_lm(config_from_args(parser, args), compare_config(args))


def swin_main(argv: list[str]) -> dict:
    from flexmoe.app.compare_swin import main as swin

    return swin(argv)


TASKS = {
    "lm": (lm_main, "the byte-level Qwen3-MoE of `flexmoe lm` against its dense twin (held-out loss)"),
    "swin": (swin_main, "SwinV2-MoE-tiny against swinv2_tiny on MNIST-5k, and a 5-shot probe on digits"),
}


def main(argv: list[str] | None = None) -> dict | None:
    """`flexmoe compare TASK [options]`; `flexmoe compare TASK --help` shows a task's options."""
    argv = [] if argv is None else list(argv)
    if argv and argv[0] in TASKS:
        return TASKS[argv[0]][0](argv[1:])
    listing = "\n".join(f"  {name:<5} {text}" for name, (_, text) in TASKS.items())
    parser = cli_args.ArgumentParser(
        prog="flexmoe compare",
        description=f"{__doc__}\ntasks:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("task", choices=list(TASKS), help="what to compare (listed above)")
    parser.parse_args(argv)  # --help, or a one-line error: no task or an unknown one
    return None
