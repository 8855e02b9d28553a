"""`flexmoe lm` (and `make demo-lm`): a small Qwen3-MoE-style language model (byte-level vocabulary)
built from a transformers config, trained on the Python standard library's own source files by 2
processes with its experts sharded by flexmoe (`shard_experts`) and run under the adaptive plans.
Needs the optional extra `flexmoe[transformers]`; offline (the data is on every machine).

The launcher checks every option, then starts the training module (flexmoe.lm.train, which takes
the same options but --nproc) through torchrun on this machine (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing the training module here would import it twice under `-m`
    from flexmoe.app.cli_args import ArgumentParser
    from flexmoe.lm.train import LMConfig


def main(argv: list[str] | None = None) -> None:
    from flexmoe.app.cli_args import positive_int, without_option
    from flexmoe.lm.train import build_parser, config_from_args

    argv = [] if argv is None else list(argv)
    parser = build_parser(prog="flexmoe lm", description=__doc__)
    parser.allow_abbrev = False  # --nproc is taken out of argv by its exact name
    parser.add_argument("--nproc", type=positive_int, default=2, help="processes (ranks) (default: 2)")
    args = parser.parse_args(argv)  # every option checked before any process starts
    _check_layout(parser, config_from_args(parser, args), args.nproc)
    if importlib.util.find_spec("transformers") is None:  # else every rank would fail on its import
        raise ValueError("needs transformers, the optional extra: pip install 'flexmoe[transformers]'")
    from torch.distributed.run import main as torchrun

    train_argv = without_option(argv, "--nproc")
    torchrun(["--standalone", f"--nproc-per-node={args.nproc}", "-m", "flexmoe.lm.train", *train_argv])


def _check_layout(parser: ArgumentParser, config: LMConfig, nproc: int) -> None:
    """The experts must split evenly over the ranks (whole experts, or equal slices of one)."""
    from flexmoe.core.layout import ExpertLayout

    try:
        ExpertLayout(
            num_experts=config.experts,
            model_dim=config.hidden_size,
            hidden_dim=config.moe_intermediate_size,
            world_size=nproc,
        )
    except ValueError as exc:
        parser.error(f"argument --nproc: {nproc} ranks cannot share the experts: {exc}")
