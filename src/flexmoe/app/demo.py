"""`flexmoe demo` (and `make demo`): SwinV2-MoE trained on MNIST-5k by 2 processes with the adaptive
runtime, then the report: per-epoch accuracy, `test_accuracy=<value>`, runs/demo/metrics.json and plots.

It launches `flexmoe train` through torchrun (the standard launcher), on this machine, with gloo on
CPU or NCCL on GPUs; every `flexmoe train` option is accepted (and checked before any process starts).
"""

from __future__ import annotations

from flexmoe.app.cli_args import positive_int, without_option
from flexmoe.app.train import build_parser, config_from_args

# 10 epochs of 4,000 images, 32 per rank per step (64 in all), lr 1e-3: about 96% held-out accuracy
DEMO_ARGS = ("--epochs", "10", "--batch-size", "32", "--lr", "1e-3", "--out-dir", "runs/demo")


def main(argv: list[str] | None = None) -> None:
    argv = [] if argv is None else list(argv)
    parser = build_parser(
        prog="flexmoe demo", description=f"{__doc__}\nIts own defaults: {' '.join(DEMO_ARGS)}."
    )
    parser.allow_abbrev = False  # --nproc is taken out of argv by its exact name
    parser.add_argument("--nproc", type=positive_int, default=2, help="processes (ranks)")
    train_argv = [*DEMO_ARGS, *without_option(argv, "--nproc")]
    args = parser.parse_args([*DEMO_ARGS, *argv])
    config_from_args(parser, args)  # every value checked here: a mistake is one line, not N ranks' errors
    from torch.distributed.run import main as torchrun

    torchrun(["--standalone", f"--nproc-per-node={args.nproc}", "-m", "flexmoe.cli", "train", *train_argv])
