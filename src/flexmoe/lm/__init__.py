"""`flexmoe lm` (and `make demo-lm`): a small Qwen3-MoE-style language model (byte-level vocabulary)
built from a transformers config, trained on the Python standard library's own source files by 2
processes with its experts sharded by flexmoe (`shard_experts`) and run under the adaptive plans.
Needs the optional extra `flexmoe[transformers]`; offline (the data is on every machine).

The launcher starts the training module through torchrun on this machine (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.run import main as torchrun

    parser = argparse.ArgumentParser(prog="flexmoe lm", description=__doc__)
    parser.add_argument("--nproc", type=int, default=2, help="processes (ranks)")
    args, train_args = parser.parse_known_args(argv)
    if args.nproc < 1:
        raise SystemExit(f"--nproc must be >= 1, got {args.nproc}")
    torchrun(["--standalone", f"--nproc-per-node={args.nproc}", "-m", "flexmoe.lm.train", *train_args])
