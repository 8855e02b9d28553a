"""The `flexmoe` command: benchmarks, the planner, training and inference."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module, help); modules are imported only when their command runs
COMMANDS = {
    "bench": ("flexmoe.bench", "benchmarks: layer | dist | swin"),
    "plan": ("flexmoe.planner", "predict the best plan for a layer on large clusters"),
    "tune": ("flexmoe.tune", "tune a layer or model under torchrun and write a plan file"),
    "train": ("flexmoe.train", "train a SwinV2-MoE (under torchrun for several processes)"),
    "eval": ("flexmoe.inference", "evaluate a checkpoint on a data set's held-out split"),
    "predict": ("flexmoe.inference", "classify images with a checkpoint"),
    "demo": ("flexmoe.demo", "the demo: SwinV2-MoE on MNIST-5k, 2 processes, adaptive runtime"),
}
BENCHMARKS = {"layer": "flexmoe.bench.layer", "dist": "flexmoe.bench.dist", "swin": "flexmoe.bench.swin"}


def _bench(argv: list[str]) -> None:
    if not argv or argv[0] not in BENCHMARKS:
        raise SystemExit(f"usage: flexmoe bench {{{'|'.join(BENCHMARKS)}}} [options]")
    importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="flexmoe", description=__doc__)
    parser.add_argument(
        "command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items())
    )
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "bench":
        _bench(argv[1:])
    else:
        module = importlib.import_module(COMMANDS[args.command][0])
        getattr(module, f"{args.command}_main", module.main)(argv[1:])


if __name__ == "__main__":
    main()
