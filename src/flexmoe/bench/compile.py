"""`flexmoe bench compile`: a transformer block with a MoELayer, eager against torch.compile.

The block is pre-norm attention then a pre-norm MoE FFN, with residuals; every step is a forward and
backward on a different token count (sequences of varying length), as training on packed or bucketed
batches gives. The same block runs both ways in interleaved rounds (same weights), in fp32 and under
bf16 autocast. It reports the median step times, their paired ratio, the graphs dynamo built after
warm-up and after the timed rounds (no new graph should appear), and how far the outputs differ.

Under torchrun (gloo, CPU) every rank runs the block on its own tokens and the MoE layers exchange
them; rank 0 prints. The MoE layer itself is one graph break (flexmoe.layer: torch.compile runs it
as eager), so what compiles is the block around it.
"""

from __future__ import annotations

import copy
import os
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from flexmoe.app.cli_args import ArgumentParser, nonnegative_int, positive_int
from flexmoe.app.launch import init_distributed
from flexmoe.app.reporting import environment, format_table
from flexmoe.bench.common import interleaved_times, matmul_rates, paired_ratio
from flexmoe.json_file import write_json
from flexmoe.layer import MoELayer

SEQ_LENS = (96, 128, 160, 112)  # tokens per sequence, one per step in turn
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


class MoEBlock(nn.Module):
    """x + attention(norm(x)), then + MoE(norm(x)): a decoder block of today's MoE LLMs."""

    def __init__(self, *, dim: int, heads: int, hidden: int, experts: int, top_k: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.moe_norm = nn.LayerNorm(dim)
        self.moe = MoELayer(dim, hidden, experts, top_k=top_k, activation="swiglu", capacity_factor=0)

    def forward(self, x_BSM: torch.Tensor) -> torch.Tensor:
        B, S, M = x_BSM.shape
        q, k, v = self.qkv(self.attn_norm(x_BSM)).view(B, S, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, M)
        x_BSM = x_BSM + self.proj(a)
        return x_BSM + self.moe(self.moe_norm(x_BSM))


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def bench(args, dtype, rank: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    sizes = dict(dim=args.dim, heads=args.heads, hidden=args.hidden, experts=args.experts, top_k=args.top_k)
    block = MoEBlock(**sizes).to(device)
    compiled = torch.compile(copy.deepcopy(block))  # a copy: each keeps its own tuner and buffers
    gen = torch.Generator().manual_seed(1000 + rank)
    inputs = [torch.randn(args.batch, s, args.dim, generator=gen).to(device) for s in SEQ_LENS]
    state = {"i": 0}

    def autocast():
        return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    def step(model):
        def run():
            x = inputs[state["i"] % len(inputs)].requires_grad_()
            with autocast():
                y = model(x)
            y.float().square().mean().backward()

        return run

    graphs_before = _graphs()
    with torch.no_grad(), autocast():
        diff = max(float((block(x) - compiled(x)).abs().max()) for x in inputs)
    steps = {"eager": step(block), "compiled": step(compiled)}
    for _ in range(args.warmup):  # every token count, both ways: the compiles happen here
        for s in range(len(inputs)):
            state["i"] = s
            for run in steps.values():
                run()
    after_warmup = _graphs() - graphs_before
    times = {name: [] for name in steps}
    for r in range(args.repeats):
        state["i"] = r
        for name, seconds in interleaved_times(steps, warmup=0, repeats=1, device=device).items():
            times[name] += seconds
    return {
        "precision": "bf16" if dtype is not None else "fp32",
        "eager_ms": 1e3 * statistics.median(times["eager"]),
        "compiled_ms": 1e3 * statistics.median(times["compiled"]),
        "compiled_over_eager": paired_ratio(times["compiled"], times["eager"]),
        "graphs_after_warmup": after_warmup,
        "new_graphs_while_timed": _graphs() - graphs_before - after_warmup,
        "max_abs_diff": diff,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(prog="flexmoe bench compile", description=__doc__)
    parser.add_argument("--dim", type=positive_int, default=256)
    parser.add_argument("--heads", type=positive_int, default=4)
    parser.add_argument("--hidden", type=positive_int, default=256, help="expert hidden size")
    parser.add_argument("--experts", type=positive_int, default=8)
    parser.add_argument("--top-k", type=positive_int, default=2)
    parser.add_argument("--batch", type=positive_int, default=8, help="sequences per step")
    parser.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both")
    parser.add_argument("--repeats", type=positive_int, default=20, help="timed rounds")
    parser.add_argument(
        "--warmup", type=nonnegative_int, default=2, help="passes over the token counts first"
    )
    parser.add_argument("--out", default="bench_results/compile.json")
    args = parser.parse_args(argv)
    rank, world, device = init_distributed()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the ranks share the cores
    precisions = tuple(PRECISIONS) if args.precision == "both" else (args.precision,)
    rows = [bench(args, PRECISIONS[p], rank, device) for p in precisions]
    rates = matmul_rates(device=device)
    payload = {
        "environment": environment(benchmark="compile", world_size=world, **vars(args), matmul_gflops=rates),
        "results": rows,
    }
    if rank == 0:
        print(
            f"fp32 {rates['fp32_gflops']:.0f} GFLOP/s, bf16 {rates['bf16_gflops']:.0f} GFLOP/s, ranks {world}"
        )
        print(format_table(rows, tuple(rows[0])))
        print(f"wrote {write_json(args.out, payload)}")
    return payload
