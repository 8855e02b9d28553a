"""`flexmoe bench swin`: SwinV2-MoE training and inference throughput (images/s), the model built on
flexmoe against the same model built on the einsum (Fairseq/GShard) layer, same weights, one run.

The configuration puts an MoE layer in every other block of every stage so that the MoE blocks are a
real share of the compute (the Swin-MoE default has them only in the last two stages, where 32x32
inputs leave a handful of tokens).
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from flexmoe.app.cli_args import (
    ArgumentParser,
    add_cpu_allocator_argument,
    apply_cpu_allocator,
    nonnegative_int,
    positive_int,
)
from flexmoe.app.reporting import environment, format_table
from flexmoe.bench.common import interleaved_times, paired_ratio
from flexmoe.json_file import write_json
from flexmoe.models import create_model

CONFIG = dict(
    img_size=32,
    patch_size=2,
    in_chans=3,
    num_classes=10,
    embed_dim=48,
    depths=(2, 2, 2, 2),
    num_heads=(2, 4, 8, 16),
    window_size=4,
    num_experts=16,
    moe_blocks=((1,), (1,), (1,), (1,)),
    drop_path_rate=0.0,
    seed=0,
)
# the Swin-MoE placement (odd blocks of the last two stages) leaves the MoE layers few tokens at 32 px
PLACEMENTS = {"every other block, all stages": CONFIG, "Swin-MoE (stages 3-4)": dict(CONFIG, moe_blocks=None)}
QUICK = dict(CONFIG, img_size=16, embed_dim=16, num_heads=(1, 2, 4, 8), num_experts=4)


def _models(config: dict):
    torch.manual_seed(0)
    flex = create_model("swinv2_moe_tiny", **config)
    torch.manual_seed(0)
    einsum = create_model("swinv2_moe_tiny", moe_implementation="einsum", **config)
    einsum.load_state_dict(flex.state_dict())
    return {"flexmoe": flex, "einsum": einsum}


def bench(config: dict, *, batch: int, repeats: int, warmup: int) -> list[dict]:
    x = torch.randn(batch, config["in_chans"], config["img_size"], config["img_size"])
    y = torch.randint(0, config["num_classes"], (batch,))
    models = _models(config)
    steps = {}
    for name, model in models.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_step(model=model, optimizer=optimizer):
            model.train()
            loss = F.cross_entropy(model(x), y) + model.aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def infer_step(model=model):
            model.eval()
            with torch.no_grad():
                model(x)

        steps[f"{name}_train"], steps[f"{name}_infer"] = train_step, infer_step
    times = interleaved_times(steps, warmup=warmup, repeats=repeats)
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    rows = [
        {
            "implementation": name,
            "train_images_per_s": batch / seconds[f"{name}_train"],
            "infer_images_per_s": batch / seconds[f"{name}_infer"],
            "train_step_s": seconds[f"{name}_train"],
            "infer_step_s": seconds[f"{name}_infer"],
        }
        for name in models
    ]
    flex = rows[0]
    for key in ("train", "infer"):
        flex[f"{key}_speedup"] = paired_ratio(times[f"einsum_{key}"], times[f"flexmoe_{key}"])
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(prog="flexmoe bench swin", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a tiny model (smoke test)")
    parser.add_argument("--batch", type=positive_int, default=64, help="images per step")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed rounds first")
    parser.add_argument("--out", default="bench_results/swin.json")
    add_cpu_allocator_argument(parser)
    args = parser.parse_args(argv)
    allocator = apply_cpu_allocator(args.cpu_allocator)
    configs = {"quick": QUICK} if args.quick else PLACEMENTS
    rows = []
    for placement, config in configs.items():
        for row in bench(config, batch=args.batch, repeats=args.repeats, warmup=args.warmup):
            rows.append({"moe_placement": placement, **row})
        print(f"done: {placement}", flush=True)
    columns = (
        "moe_placement",
        "implementation",
        "train_images_per_s",
        "infer_images_per_s",
        "train_speedup",
        "infer_speedup",
    )
    print(format_table(rows, columns))
    payload = {
        "environment": environment(
            benchmark="swin",
            batch=args.batch,
            repeats=args.repeats,
            warmup=args.warmup,
            models=configs,
            cpu_allocator=allocator,
        ),
        "results": rows,
    }
    print(f"wrote {write_json(args.out, payload)}")
    return payload
