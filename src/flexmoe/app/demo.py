"""`flexmoe demo` (and `make demo`): SwinV2-MoE trained on MNIST-5k by 2 processes with the adaptive
runtime, then the report: per-epoch accuracy, `test_accuracy=<value>`, runs/demo/metrics.json and plots.

It launches itself through torchrun (the standard launcher), on this machine, with gloo on CPU or
NCCL on GPUs.
"""

from __future__ import annotations

from torch.distributed.run import main as torchrun

from flexmoe.app.cli_args import ArgumentParser, positive_int

# 10 epochs of 4,000 images, 32 per rank per step (64 in all), lr 1e-3: about 96% held-out accuracy
DEMO_ARGS = ["--epochs", "10", "--batch-size", "32", "--lr", "1e-3", "--out-dir", "runs/demo"]


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="flexmoe demo", description=__doc__)
    parser.add_argument("--nproc", type=positive_int, default=2, help="processes (ranks)")
    args, train_args = parser.parse_known_args(argv)
    torchrun(
        [
            "--standalone",
            f"--nproc-per-node={args.nproc}",
            "-m",
            "flexmoe.cli",
            "train",
            *DEMO_ARGS,
            *train_args,
        ]
    )
