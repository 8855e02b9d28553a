"""`flexmoe tune` (under torchrun): run one MoE layer configuration, or a registered model such as
SwinV2-MoE, forward + backward on random data until every run-time tuner has decided its capacity
bucket, then write the plan file that `MoELayer(..., plan_table=FILE)` and
`flexmoe train --plan-table FILE` start from (a plan file holds the world size and ranks it was
measured on; a run on other ones explores afresh).

    torchrun --standalone --nproc-per-node 2 -m flexmoe.cli tune --out plans.json
    torchrun --standalone --nproc-per-node 2 -m flexmoe.cli tune --model swinv2_moe_tiny --out plans.json

Tuning is all exploration, so the tuners' exploration budget is lifted (--explore-budget).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from flexmoe import MoELayer
from flexmoe.app import cli_args
from flexmoe.app.launch import init_distributed
from flexmoe.app.reporting import format_table
from flexmoe.core.layout import ACTIVATIONS
from flexmoe.models import list_models
from flexmoe.tuning.plan_table import tuned_layers, write_plan_table
from flexmoe.tuning.tuner import TunerConfig


def _layer_step(args, rank: int, device):
    layer = MoELayer(
        args.model_dim,
        args.hidden_dim,
        args.experts or 2 * dist.get_world_size(),
        top_k=args.top_k,
        capacity_factor=args.capacity_factor,
        activation=args.activation,
        seed=args.seed,
        tuner=TunerConfig(explore_budget=args.explore_budget),
        device=device,
    )
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    x = torch.randn(args.tokens, args.model_dim, generator=gen).to(device)

    def step():
        layer(x).square().mean().backward()

    return layer, step


def _model_step(args, rank: int, device):
    from flexmoe.models import create_model

    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    torch.manual_seed(args.seed)  # identical replicated parameters on every rank
    model = create_model(args.model, **overrides).to(device)
    for layer in tuned_layers(model).values():
        layer.tuner.config = replace(layer.tuner.config, explore_budget=args.explore_budget)
    size, chans = model.config.img_size, model.config.in_chans
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    images = torch.randn(args.batch_size, chans, size, size, generator=gen).to(device)
    labels = torch.randint(0, model.config.num_classes, (args.batch_size,), generator=gen).to(device)

    def step():
        (F.cross_entropy(model(images), labels) + model.aux_loss).backward()

    return model, step


def tune(args, rank: int, device) -> dict:
    model, step = (_model_step if args.model else _layer_step)(args, rank, device)
    tuners = [m.tuner for m in tuned_layers(model).values()]
    if not tuners:
        raise ValueError("nothing to tune: the model has no MoE layer with a run-time tuner")
    steps = 0
    # every rank's tuners walk in lockstep (agreed statistics), so every rank stops at the same step
    while steps < args.max_steps and (steps == 0 or any(t.exploring for t in tuners)):
        step()
        steps += 1
    rows = [
        {"layer": name, **row}
        for name, m in tuned_layers(model).items()
        for row in m.tuner.table()
        if row["trials"] or row["chosen"]
    ]
    if rank == 0:
        print(
            format_table(rows, ("layer", "bucket", "plan", "predicted_s", "measured_s", "trials", "status"))
        )
        path = write_plan_table(args.out, model)
        print(f"{steps} steps; wrote {path}", flush=True)
    return {"steps": steps, "rows": rows, "settled": not any(t.exploring for t in tuners)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    a = cli_args
    p = a.ArgumentParser(prog="flexmoe tune", description=__doc__)
    p.add_argument(
        "--model", choices=list_models(), default=None, help="a registered model; default: one layer"
    )
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="model config override")
    p.add_argument("--batch-size", type=a.positive_int, default=32, help="images per rank (--model)")
    p.add_argument("--model-dim", type=a.positive_int, default=256)
    p.add_argument("--hidden-dim", type=a.positive_int, default=1024)
    p.add_argument("--experts", type=a.positive_int, default=None, help="total experts (default 2 per rank)")
    p.add_argument("--top-k", type=a.positive_int, default=2)
    p.add_argument("--capacity-factor", type=a.positive_float, default=1.0)
    p.add_argument("--activation", choices=ACTIVATIONS, default="gelu")
    p.add_argument("--tokens", type=a.positive_int, default=1024, help="tokens per rank per step (one layer)")
    p.add_argument("--max-steps", type=a.positive_int, default=200)
    p.add_argument(
        "--explore-budget", type=a.unit_interval, default=1.0, help="share of steps on non-chosen plans"
    )
    p.add_argument("--seed", type=a.nonnegative_int, default=0)
    p.add_argument("--out", default="plans.json")
    a.add_cpu_allocator_argument(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not (dist.is_initialized() or dist.is_torchelastic_launched()):
        raise ValueError("run under torchrun: torchrun --standalone --nproc-per-node 2 -m flexmoe.cli tune")
    cli_args.apply_cpu_allocator(args.cpu_allocator)
    rank, _, device = init_distributed()
    try:
        return tune(args, rank, device)
    finally:
        dist.destroy_process_group()
