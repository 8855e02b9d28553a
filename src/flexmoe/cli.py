"""The `flexmoe` command: benchmarks, the planner, training and inference.

A user error (a bad option value, a missing or damaged checkpoint) prints one line on stderr and
exits with code 2; `--debug` (anywhere on the command line) shows the traceback instead.
"""

from __future__ import annotations

import importlib
import sys

from flexmoe.app.cli_args import ArgumentParser, run

# sub-command -> (module, help); modules are imported only when their command runs
COMMANDS = {
    "bench": ("flexmoe.bench", "benchmarks: layer | dist | swin | hf"),
    "plan": ("flexmoe.app.plan", "predict the best plan for a layer on large clusters"),
    "tune": ("flexmoe.app.tune", "tune a layer or model under torchrun and write a plan file"),
    "train": ("flexmoe.app.train", "train a SwinV2-MoE (under torchrun for several processes)"),
    "eval": ("flexmoe.app.inference", "evaluate a checkpoint on a data set's held-out split"),
    "predict": ("flexmoe.app.inference", "classify images with a checkpoint"),
    "demo": ("flexmoe.app.demo", "the demo: SwinV2-MoE on MNIST-5k, 2 processes, adaptive runtime"),
    "lm": ("flexmoe.lm", "a byte-level Qwen3-MoE (transformers) on the Python stdlib, experts sharded"),
}
BENCHMARKS = {
    "layer": "flexmoe.bench.layer",
    "dist": "flexmoe.bench.dist",
    "swin": "flexmoe.bench.swin",
    "hf": "flexmoe.bench.hf",
}


def _bench(argv: list[str]):
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: flexmoe bench {{{'|'.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        raise SystemExit(2)
    return importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])


def execute(argv: list[str]) -> object:
    """Run one command line and return what the command returns (tests use it in-process)."""
    argv = list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = ArgumentParser(prog="flexmoe", description=__doc__)
    parser.add_argument(
        "command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items())
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    args, _ = parser.parse_known_args(argv[:1])
    if args.command == "bench":
        return run("flexmoe bench", lambda: _bench(argv[1:]), debug=debug)
    module = importlib.import_module(COMMANDS[args.command][0])
    entry = getattr(module, f"{args.command}_main", module.main)
    return run(f"flexmoe {args.command}", lambda: entry(argv[1:]), debug=debug)


def main(argv: list[str] | None = None) -> None:
    """The console script: returns None, as `sys.exit(main())` would print anything else and exit 1."""
    execute(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
