"""The `flexmoe` command: benchmarks, the planner, training and inference.

A user error (a bad option value, a missing or damaged checkpoint) prints one line on stderr and
exits with code 2; `--debug` (anywhere on the command line) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from flexmoe.app.cli_args import ArgumentParser, run

# sub-command -> (module, help); modules are imported only when their command runs
COMMANDS = {
    "bench": ("flexmoe.bench", "benchmarks: layer | dist | swin | hf (flexmoe bench --help)"),
    "plan": ("flexmoe.app.plan", "predict the best plan for a layer on large clusters"),
    "tune": ("flexmoe.app.tune", "tune a layer or model under torchrun and write a plan file"),
    "train": ("flexmoe.app.train", "train a SwinV2-MoE (under torchrun for several processes)"),
    "eval": ("flexmoe.app.inference", "evaluate a checkpoint on a data set's held-out split"),
    "predict": ("flexmoe.app.inference", "classify images with a checkpoint"),
    "demo": ("flexmoe.app.demo", "the demo: SwinV2-MoE on MNIST-5k, 2 processes, adaptive runtime"),
    "lm": ("flexmoe.lm", "a byte-level Qwen3-MoE (transformers) on the Python stdlib, experts sharded"),
    "compare": ("flexmoe.lm.compare", "an MoE against its dense twin (same active parameters): lm | swin"),
}
# benchmark -> (module, help)
BENCHMARKS = {
    "layer": ("flexmoe.bench.layer", "one process: the layer against the einsum layer, fairscale and floors"),
    "dist": ("flexmoe.bench.dist", "under torchrun: the adaptive model against every static plan"),
    "swin": ("flexmoe.bench.swin", "SwinV2-MoE training and inference throughput against the einsum layer"),
    "compile": ("flexmoe.bench.compile", "a block with a MoELayer, eager against torch.compile (fp32, bf16)"),
    "hf": ("flexmoe.bench.hf", "transformers experts backends; --dist: native EP, flexmoe EP, shard_experts"),
}


def _bench(argv: list[str]):
    """`flexmoe bench NAME [options]`; `flexmoe bench --help` lists the benchmarks."""
    if argv and argv[0] in BENCHMARKS:
        return importlib.import_module(BENCHMARKS[argv[0]][0]).main(argv[1:])
    listing = "\n".join(f"  {name:<6} {text}" for name, (_, text) in BENCHMARKS.items())
    parser = ArgumentParser(
        prog="flexmoe bench",
        description="Benchmarks; each prints a table and writes JSON with the environment.\n\n"
        f"benchmarks:\n{listing}\n\n`flexmoe bench NAME --help` shows a benchmark's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # one line per benchmark
    )
    parser.add_argument("benchmark", choices=list(BENCHMARKS), help="the benchmark to run (listed above)")
    parser.parse_args(argv)  # --help, or a one-line error: no benchmark or an unknown one


def execute(argv: list[str]) -> object:
    """Run one command line and return what the command returns (tests use it in-process)."""
    argv = list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    listing = "\n".join(f"  {name:<8} {text}" for name, (_, text) in COMMANDS.items())
    parser = ArgumentParser(
        prog="flexmoe",
        description=f"{__doc__}\ncommands:\n{listing}\n\n`flexmoe COMMAND --help` shows a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # one line per command
    )
    parser.add_argument("command", choices=sorted(COMMANDS), help="the command to run (listed above)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    args, _ = parser.parse_known_args(argv[:1])
    if args.command == "bench":
        return run("flexmoe bench", lambda: _bench(argv[1:]), debug=debug)
    module = importlib.import_module(COMMANDS[args.command][0])
    entry = getattr(module, f"{args.command}_main", module.main)
    return run(f"flexmoe {args.command}", lambda: entry(argv[1:]), debug=debug)


def main(argv: list[str] | None = None) -> None:
    """The console script: returns None, as `sys.exit(main())` would print anything else and exit 1."""
    try:
        execute(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:  # `flexmoe plan | head`: the reader left early, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
