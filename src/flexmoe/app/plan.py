"""`flexmoe plan`: predicted step time of every plan for a layer on clusters of 16 to thousands of GPUs.

The capacity per (rank, expert) follows from the routing settings: C = ceil(k * cf * T / E) with T
tokens per rank. Prints, per world size, every plan's predicted forward + backward time of one layer,
the best plan and its speedup over the static default (r = 1, d = 1, flat), under a legend of the
columns. Times in ms with one decimal, speedups with two; --out keeps the unrounded figures.
"""

from __future__ import annotations

import math

from flexmoe.app.cli_args import ArgumentParser, positive_float, positive_int, positive_int_list
from flexmoe.app.reporting import format_table
from flexmoe.core.plans import STATIC_DEFAULT
from flexmoe.json_file import write_json
from flexmoe.tuning.cost_model import PRESETS, CostModel, LayerShape, candidate_plans


def predicted_plans(shape: LayerShape, model: CostModel) -> tuple[list[dict], dict]:
    two_dh = shape.world_size > model.cluster.gpus_per_node
    ranked = model.rank(shape, candidate_plans(shape, two_dh=two_dh))
    static = model.step_time(shape, STATIC_DEFAULT)
    rows = [
        {"W": shape.world_size, "plan": p.describe(), "predicted_ms": t * 1e3, "speedup": static / t}
        for p, t in ranked
    ]
    best_plan, best_t = ranked[0]
    summary = {
        "W": shape.world_size,
        "E": shape.num_experts,
        "s": shape.shards_per_expert,
        "capacity": shape.capacity,
        "best": best_plan.describe(),
        "best_ms": best_t * 1e3,
        "static_ms": static * 1e3,
        "speedup": static / best_t,
    }
    return rows, summary


# (column, meaning), printed above the tables
LEGEND = (
    ("W", "ranks (GPUs)"),
    ("E", "experts"),
    ("s", "ranks sharing one expert's parameters (W / E when E < W, else 1)"),
    ("capacity", "token slots per (rank, expert): C above"),
    ("plan, best", "r=0: data parallel, the expert weights all-gathered; r>=1: expert parallel, tokens"),
    ("", "sent by all-to-all, with r-way model parallelism inside an expert (r divides s)"),
    ("", "d: chunks the all-to-all is split into, overlapped with the expert GEMMs"),
    ("", "flat: one all-to-all; 2dh: intra-node, then inter-node (a token once per chosen expert);"),
    ("", "dedup: a token once per rank holding any of its experts (whole experts, d = 1)"),
    ("*_ms", "predicted forward + backward time of one layer on one rank, in ms"),
    ("static_ms", "the static default plan, r=1 d=1 flat"),
    ("speedup", "static_ms / the plan's time (> 1: faster than the static default)"),
)
TIMES = ("predicted_ms", "best_ms", "static_ms")
RATIOS = ("speedup",)


def _shown(row: dict) -> dict:
    """A row as printed: times with one decimal, speedups with two."""
    return {k: f"{v:.1f}" if k in TIMES else f"{v:.2f}" if k in RATIOS else v for k, v in row.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(prog="flexmoe plan", description=__doc__)
    parser.add_argument("--model-dim", type=positive_int, default=2048)
    parser.add_argument("--hidden-dim", type=positive_int, default=8192)
    parser.add_argument("--experts", type=positive_int, default=64, help="total experts E")
    parser.add_argument("--tokens", type=positive_int, default=8192, help="tokens per rank per step")
    parser.add_argument("--top-k", type=positive_int, default=2)
    parser.add_argument(
        "--capacity-factor", type=positive_float, default=1.25, help="> 0 (the capacity must be known)"
    )
    parser.add_argument("--bytes", type=positive_int, default=2, help="bytes per element (2 = bf16)")
    parser.add_argument("--cluster", choices=sorted(PRESETS), default="a100")
    parser.add_argument("--world-sizes", type=positive_int_list, default=[16, 64, 256, 1024, 2048])
    parser.add_argument("--all", action="store_true", help="print every plan, not only the summary")
    parser.add_argument("--out", default=None, help="write the tables as JSON here")
    args = parser.parse_args(argv)
    if args.top_k > args.experts:
        parser.error(f"argument --top-k: must not exceed --experts={args.experts}, got {args.top_k}")
    model = CostModel(PRESETS[args.cluster])
    capacity = max(1, math.ceil(args.top_k * args.capacity_factor * args.tokens / args.experts))
    summaries, every = [], []
    for W in args.world_sizes:
        if (args.experts >= W and args.experts % W) or (args.experts < W and W % args.experts):
            print(f"skip W={W}: E={args.experts} and W must divide one another")
            continue
        shape = LayerShape(
            model_dim=args.model_dim,
            hidden_dim=args.hidden_dim,
            num_experts=args.experts,
            world_size=W,
            capacity=capacity,
            tokens=args.tokens,
            top_k=args.top_k,
            bytes_per_element=args.bytes,
        )
        rows, summary = predicted_plans(shape, model)
        every += rows
        summaries.append(summary)
    print(
        f"cluster: {model.cluster.name}; M={args.model_dim} H={args.hidden_dim} E={args.experts} "
        f"T={args.tokens}/rank k={args.top_k} cf={args.capacity_factor} -> C={capacity}"
    )
    print("legend:\n" + "\n".join(f"  {column:<11} {meaning}" for column, meaning in LEGEND))
    if args.all:
        print(format_table([_shown(r) for r in every], ("W", "plan", "predicted_ms", "speedup")))
    columns = ("W", "E", "s", "capacity", "best", "best_ms", "static_ms", "speedup")
    print(format_table([_shown(r) for r in summaries], columns))
    payload = {"cluster": args.cluster, "args": vars(args), "summary": summaries, "plans": every}
    if args.out:
        write_json(args.out, payload)
    return payload
