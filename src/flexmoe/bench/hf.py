"""`flexmoe bench hf`: a Qwen3-MoE-shaped transformers model, flexmoe's experts backend against every
transformers experts backend, training steps (forward, backward, AdamW) in fp32 and bf16.

One process (the default): the whole step per backend, and the experts' part alone (one MoE block's
experts called on the routing its router gives, forward + backward), with the speedup of "flexmoe"
over each backend as paired per-round ratios. Under torchrun (`--dist`), fp32 training steps of:
plain DDP with "grouped_mm"; flexmoe's `shard_experts` + `wrap_data_parallel`; transformers' own
EP + FSDP2 (DistributedConfig(ep_size=W, fsdp_size=W)) with its "all_to_all" exchange, and with
flexmoe's EP implementation; step times (interleaved rounds, each round's slowest rank, medians),
speedups as paired per-round ratios, and the experts' parameter + gradient + optimizer memory per rank.
Needs the optional extra `flexmoe[transformers]`.
"""

from __future__ import annotations

import statistics
import time

import torch

from flexmoe.app.cli_args import (
    ArgumentParser,
    add_cpu_allocator_argument,
    apply_cpu_allocator,
    nonnegative_int,
    positive_int,
)
from flexmoe.app.reporting import environment, format_table
from flexmoe.bench.block_timer import BlockTimer
from flexmoe.bench.common import (
    interleaved_times,
    matmul_rate_steps,
    matmul_rates,
    paired_ratio,
    rates_from_times,
    synchronize,
)
from flexmoe.core.config import ALL_TO_ALL_ALGORITHMS
from flexmoe.json_file import write_json

MODEL = dict(
    vocab_size=256,
    hidden_size=512,
    intermediate_size=1024,
    moe_intermediate_size=256,
    num_experts=64,
    num_experts_per_tok=8,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    norm_topk_prob=True,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
QUICK = dict(
    MODEL,
    hidden_size=64,
    moe_intermediate_size=32,
    num_experts=8,
    num_experts_per_tok=2,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    intermediate_size=64,
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# gathering every selected expert's weights per token (batched_mm) needs T * k * (3 * M * I) elements
BATCHED_MM_LIMIT_BYTES = 2 << 30


def build_model(config: dict, dtype: torch.dtype, device):
    from transformers import AutoConfig, AutoModelForCausalLM

    import flexmoe.integrations.transformers  # noqa: F401  (registers "flexmoe")

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen3_moe", **config)
    return AutoModelForCausalLM.from_config(cfg, experts_implementation="grouped_mm", dtype=dtype).to(device)


def backends(
    config: dict, tokens: int, dtype: torch.dtype, requested: list[str] | None
) -> dict[str, str | None]:
    """backend -> None (runs) or why it is skipped."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    names = requested or ["flexmoe", "eager", *sorted(set(ALL_EXPERTS_FUNCTIONS) - {"flexmoe"})]
    out = {}
    for name in names:
        if name in ("deepgemm", "sonicmoe") and not torch.cuda.is_available():
            out[name] = "needs CUDA kernels"
        elif name == "batched_mm":
            need = tokens * config["num_experts_per_tok"] * 3 * config["hidden_size"]
            need *= config["moe_intermediate_size"] * torch.finfo(dtype).bits // 8
            out[name] = (
                None
                if need <= BATCHED_MM_LIMIT_BYTES
                else f"needs {need / 2**30:.0f} GiB of gathered weights"
            )
        else:
            out[name] = None
    return out


def _steps(name: str, model, optimizer, ids, experts, experts_inputs, grad):
    """A training step of the whole model, and forward + backward of one block's experts."""

    def train_step():
        model.set_experts_implementation(name)
        optimizer.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        optimizer.step()

    def experts_step():
        model.set_experts_implementation(name)
        experts(*experts_inputs).backward(grad)

    return train_step, experts_step


def gemm_floor_step(config: dict, top_i: torch.Tensor, dtype: torch.dtype, device):
    """The experts' GEMMs alone, forward + backward, on the rows the routing gives each expert (one
    mm per expert and GEMM, inputs made up front): what any experts backend must at least spend,
    element-wise work (activation, gating, gather/scatter) and the weights' gradient sums left out."""
    M, I, E = config["hidden_size"], config["moe_intermediate_size"], config["num_experts"]
    sizes = torch.bincount(top_i.reshape(-1), minlength=E).tolist()
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    # every operand made up front, contiguous in the orientation its GEMM reads: no backend lays
    # them out better
    per_expert = []
    for n in (n for n in sizes if n):
        x, a, grad_y, grad_h = rand(n, M), rand(n, I), rand(n, M), rand(n, 2 * I)
        w13, w2 = rand(M, 2 * I), rand(I, M)
        per_expert.append(
            (x, w13, a, w2, grad_y, grad_h, w2.t().contiguous(), a.t().contiguous())
            + (w13.t().contiguous(), x.t().contiguous())
        )

    def step():
        for x, w13, a, w2, grad_y, grad_h, w2_t, a_t, w13_t, x_t in per_expert:
            torch.mm(x, w13)  # gate and up projections
            torch.mm(a, w2)  # down projection
            torch.mm(grad_y, w2_t)  # backward: the down projection's input gradient
            torch.mm(a_t, grad_y)  # and its weight gradient
            torch.mm(grad_h, w13_t)  # the gate/up projections' input gradient
            torch.mm(x_t, grad_h)  # and their weight gradient

    return step


class SecondRunTimed:
    """A step that runs twice back to back and times only its second run (`seconds`): the GEMM
    floor's first run after a model's step carried a one-time cost of up to ~26 ms in bf16 on this
    project's 2-core CPU (25 ms floor: 50 ms; its cause was not found), which no backend's experts
    pass showed; a lower bound must not count it."""

    def __init__(self, step, device):
        self.step, self.device, self.seconds = step, device, []

    def __call__(self) -> None:
        self.step()
        synchronize(self.device)
        start = time.perf_counter()
        self.step()
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - start)


def one_process(config: dict, *, batch: int, seq: int, dtypes: list[str], requested, repeats, warmup, device):
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        model = build_model(config, dtype, device)
        model.train()
        ids = torch.randint(0, config["vocab_size"], (batch, seq), device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        # the experts' part: block 0's experts on the routing its own router gives
        block = model.model.layers[0].mlp
        h = torch.randn(batch * seq, config["hidden_size"], dtype=dtype, device=device) * 0.5
        with torch.no_grad():
            _, top_w, top_i = block.gate(h)
        h.requires_grad_(True)
        grad = torch.randn_like(h)
        available = backends(config, batch * seq, dtype, requested)
        steps = {}
        for name, skipped in available.items():
            if not skipped:
                steps[f"{name}/step"], steps[f"{name}/experts"] = _steps(
                    name, model, optimizer, ids, block.experts, (h, top_i, top_w), grad
                )
        floor = SecondRunTimed(gemm_floor_step(config, top_i, dtype, device), device)
        steps["gemm floor/experts"] = floor
        rate_steps, rate_flops = matmul_rate_steps(size=1024, device=device)  # in the same rounds
        times = interleaved_times({**steps, **rate_steps}, warmup=warmup, repeats=repeats, device=device)
        times["gemm floor/experts"] = floor.seconds[-repeats:]
        rates = rates_from_times(times, rate_flops)
        layers = config["num_hidden_layers"]
        for name, skipped in available.items():
            row = {"dtype": dtype_name, "backend": name, "skipped": skipped, **rates}
            if not skipped:
                row["step_ms"] = 1e3 * statistics.median(times[f"{name}/step"])
                row["experts_ms"] = 1e3 * statistics.median(times[f"{name}/experts"])
                for part in ("step", "experts"):
                    row[f"flexmoe_{part}_speedup"] = paired_ratio(
                        times[f"{name}/{part}"], times[f"flexmoe/{part}"]
                    )
                # no experts backend beats the GEMM floor: the largest speedup any could have over this one
                over_floor = paired_ratio(times[f"{name}/experts"], times["gemm floor/experts"])
                row["experts_over_gemm_floor"] = over_floor
                # the step with every block's experts at the floor; None when the block timed alone,
                # times the layers, exceeds the whole step (tiny models: per-call costs dominate)
                experts_in_step_ms = layers * row["experts_ms"]
                at_floor_ms = row["step_ms"] - experts_in_step_ms * (1 - 1 / over_floor)
                consistent = experts_in_step_ms < row["step_ms"]
                row["step_speedup_bound"] = row["step_ms"] / at_floor_ms if consistent else None
            rows.append(row)
        floor_ms = 1e3 * statistics.median(times["gemm floor/experts"])
        rows.append({"dtype": dtype_name, "backend": "gemm floor", "experts_ms": floor_ms, **rates})
        print(f"done: {dtype_name}", flush=True)
    return rows


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (the local shard of a DTensor)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _expert_bytes(model, optimizer) -> int:
    """Bytes of the experts' parameters, gradients and optimizer state held by this process."""
    total = 0
    for name, p in model.named_parameters():
        if ".experts." not in name:
            continue
        total += _local(p).numel() * p.element_size() * (2 if p.grad is not None else 1)
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                total += _local(value).numel() * value.element_size()
    return total


# --dist: warm-up rounds by default, so that the timed rounds see every variant's steady state: the
# native EP's first steps run 10-30% slower (a single warm-up step inflated flexmoe's lead to
# 1.25-1.43x), and the tuner's exploration of a new bucket lasts up to max_candidates x (1 cold +
# max_trials warm) = 28 steps with the defaults (its layers decided at steps 23-26 at W = 2)
DIST_WARMUP = 40

# the variants of --dist: DDP around the whole model; flexmoe's sharding + DDP for the rest;
# transformers' own EP + FSDP2 (DistributedConfig) with its token exchange, or with flexmoe's
DIST_VARIANTS = ("ddp_grouped_mm", "flexmoe_sharded", "hf_ep_all_to_all", "hf_ep_flexmoe")

# --adamw: the optimizer step is the same work for every variant, so a slow one only dilutes the
# differences. "fused" is torch's one-kernel AdamW (CPU and CUDA); "default" is what AdamW() picks,
# a per-tensor loop on CPU (foreach on CUDA), ~4x the fused step's time here.
ADAMW = {"fused": {"fused": True}, "default": {}}


def _plans_run(model) -> str | None:
    """The plans flexmoe's MoE layers ran last (one entry per distinct plan), or None without any."""
    from flexmoe.layer import MoELayer

    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        from flexmoe.integrations.transformers import ep_layers

        layers = list(ep_layers(model).values())
    plans = sorted({m.last_plan.plan.describe() for m in layers if m.last_plan is not None})
    return ", ".join(plans) or None


def _moe_blocks(model) -> list:
    """transformers' MoE blocks (a router `gate` beside the `experts`), whatever runs the experts;
    the outermost only (shard_experts puts a MoELayer, itself gate and experts, inside each)."""
    blocks: dict[str, torch.nn.Module] = {}
    for name, m in model.named_modules():  # parents before their children
        inside = any(name.startswith(f"{outer}.") for outer in blocks)
        if not inside and isinstance(getattr(m, "experts", None), torch.nn.Module) and hasattr(m, "gate"):
            blocks[name] = m
    return list(blocks.values())


def _hf_ep_model(folder: str, ep_implementation: str):
    """The model under transformers' own EP + FSDP2 (whole experts per rank)."""
    from flexmoe.integrations.transformers import load_expert_parallel

    return load_expert_parallel(
        folder, ep_implementation=ep_implementation, experts_implementation="grouped_mm", dtype=torch.float32
    )


def two_process(
    config: dict,
    *,
    batch: int,
    seq: int,
    repeats: int,
    warmup: int,
    device,
    layer_options: dict,
    variants: tuple[str, ...] = DIST_VARIANTS,
    adamw: str = "fused",
):
    import tempfile

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from flexmoe.integrations.transformers import register_ep_implementation, shard_experts
    from flexmoe.parallel.data_parallel import wrap_data_parallel

    rank, W = dist.get_rank(), dist.get_world_size()
    rates = matmul_rates(device=device)  # every rank at once, as the steps run
    ids = torch.randint(0, config["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(rank))
    ids = ids.to(device)
    # the flexmoe EP implementation with the plan asked for (the tuner's with "adaptive")
    register_ep_implementation("flexmoe_bench", **layer_options)
    names, variants, block_seconds = variants, {}, {}
    with tempfile.TemporaryDirectory() as own_folder:
        # transformers' EP loads a checkpoint: rank 0's (save_pretrained writes on rank 0 only), so
        # the ranks share a file system (one node, as torchrun --nproc-per-node runs it)
        box = [own_folder]
        dist.broadcast_object_list(box, src=0)
        folder = box[0]
        if rank == 0:
            build_model(config, torch.float32, "cpu").save_pretrained(folder)
        dist.barrier()
        for name in names:
            if name == "hf_ep_all_to_all":
                wrapped = model = _hf_ep_model(folder, "all_to_all")
            elif name == "hf_ep_flexmoe":
                wrapped = model = _hf_ep_model(folder, "flexmoe_bench")
            else:
                model = build_model(config, torch.float32, device)
                if name == "flexmoe_sharded":
                    wrapped = wrap_data_parallel(shard_experts(model, **layer_options))
                else:
                    wrapped = DistributedDataParallel(model)
            model.train()
            optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-5, **ADAMW[adamw])
            timer, block_seconds[name] = BlockTimer(_moe_blocks(model)), []

            def step(wrapped=wrapped, optimizer=optimizer, timer=timer, spent=block_seconds[name]):
                optimizer.zero_grad()
                wrapped(ids, labels=ids).loss.backward()
                optimizer.step()
                spent.append(timer.reset())

            variants[name] = (step, model, optimizer)
        dist.barrier()  # rank 0 removes the checkpoint once every rank has loaded it
    times = interleaved_times(
        {n: v[0] for n, v in variants.items()}, warmup=warmup, repeats=repeats, device=device
    )
    # a round of a step lasts as long as its slowest rank: every figure below is the group's
    # the MoE blocks' share of each timed round, on the rank that spent longest in them
    in_blocks = {name: spent[-repeats:] for name, spent in block_seconds.items()}
    for table in (times, in_blocks):
        for name, seconds in table.items():
            per_round = torch.tensor(seconds, dtype=torch.float64)
            dist.all_reduce(per_round, op=dist.ReduceOp.MAX)
            table[name] = per_round.tolist()

    def speedup(baseline: str, name: str, table=times) -> float | None:
        return paired_ratio(table[baseline], table[name]) if baseline in table else None

    rows = []
    ddp = variants.get("ddp_grouped_mm")
    ddp_bytes = _expert_bytes(ddp[1], ddp[2]) if ddp is not None else None
    for name, (_, model, optimizer) in variants.items():
        expert_bytes = _expert_bytes(model, optimizer)
        rows.append(
            {
                "variant": name,
                "world_size": W,
                "step_ms": 1e3 * statistics.median(times[name]),
                "expert_MiB_per_rank": expert_bytes / 2**20,
                # paired per-round ratios: > 1 is faster than the baseline
                "speedup_vs_ddp": speedup("ddp_grouped_mm", name),
                "speedup_vs_hf_ep": speedup("hf_ep_all_to_all", name),
                # forward and backward inside the MoE blocks (router, experts, FSDP2's hooks for them)
                "moe_blocks_ms": 1e3 * statistics.median(in_blocks[name]),
                "moe_blocks_speedup_vs_hf_ep": speedup("hf_ep_all_to_all", name, in_blocks),
                "memory_ratio": None if ddp_bytes is None else expert_bytes / ddp_bytes,
                "plans": _plans_run(model),  # flexmoe's, after the last timed step
                **rates,
            }
        )
    return rows


def _layer_options(parser: ArgumentParser, plan: str) -> dict:
    """--plan: "adaptive" -> {} (the tuner decides); "r,d" or "r,d,algorithm" -> that plan (flat when
    no algorithm is named)."""
    if plan == "adaptive":
        return {}
    parts = plan.split(",")
    if len(parts) == 2:
        parts.append("flat")
    if (
        len(parts) != 3
        or not (parts[0].isdigit() and parts[1].isdigit())
        or parts[2] not in ALL_TO_ALL_ALGORITHMS
    ):
        parser.error(
            f"argument --plan: must be 'adaptive', r,d or r,d,algorithm (two integers, then one of "
            f"{ALL_TO_ALL_ALGORITHMS}), got {plan!r}"
        )
    return dict(parallelism=int(parts[0]), pipeline_degree=int(parts[1]), all_to_all=parts[2])


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(prog="flexmoe bench hf", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a tiny model (smoke test)")
    parser.add_argument(
        "--dist",
        action="store_true",
        help="under torchrun: shard_experts vs DDP vs transformers' own EP, with its exchange or flexmoe's",
    )
    parser.add_argument("--batch", type=positive_int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=positive_int, default=128, help="tokens per sequence")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--backends", default=None, help="comma-separated (default: every registered one)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed rounds")
    parser.add_argument(
        "--warmup",
        type=nonnegative_int,
        default=None,
        help="untimed rounds first (default 1; 40 with --dist, so that every variant is warm and the tuner "
        "has explored: the timed rounds see the steady state)",
    )
    parser.add_argument(
        "--plan",
        default="adaptive",
        help="--dist, flexmoe's variants: 'adaptive' (the tuner, exploring during the first steps) or r,d "
        "(e.g. 1,1; flat)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(DIST_VARIANTS),
        help=f"--dist: comma-separated subset of {', '.join(DIST_VARIANTS)} (each keeps a model alive)",
    )
    parser.add_argument(
        "--adamw",
        choices=tuple(ADAMW),
        default="fused",
        help="--dist: the optimizer's implementation, the same for every variant (default fused)",
    )
    parser.add_argument("--out", default=None)
    add_cpu_allocator_argument(parser)
    args = parser.parse_args(argv)
    for name in args.dtypes.split(","):
        if name not in DTYPES:
            parser.error(
                f"argument --dtypes: must be a comma-separated subset of {tuple(DTYPES)}, got {name!r}"
            )
    variants = tuple(args.variants.split(","))
    for name in variants:
        if name not in DIST_VARIANTS:
            parser.error(
                f"argument --variants: must be a comma-separated subset of {DIST_VARIANTS}, got {name!r}"
            )
    layer_options = _layer_options(parser, args.plan)  # checked before any process group starts
    allocator = apply_cpu_allocator(args.cpu_allocator)
    config = QUICK if args.quick else MODEL
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    warmup = args.warmup
    if warmup is None:
        warmup = DIST_WARMUP if args.dist else 1
    timing = dict(batch=args.batch, seq=args.seq, repeats=args.repeats, warmup=warmup, device=device)
    if args.dist:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rows = two_process(config, layer_options=layer_options, variants=variants, adamw=args.adamw, **timing)
        columns = ("variant", "world_size", "step_ms", "expert_MiB_per_rank", "speedup_vs_ddp")
        columns += ("speedup_vs_hf_ep", "moe_blocks_ms", "moe_blocks_speedup_vs_hf_ep")
        columns += ("memory_ratio", "plans")
        columns += ("fp32_gflops", "bf16_gflops")
        if dist.get_rank() != 0:
            dist.destroy_process_group()
            return {}
        dist.destroy_process_group()
    else:
        requested = args.backends.split(",") if args.backends else None
        rows = one_process(config, dtypes=args.dtypes.split(","), requested=requested, **timing)
        columns = (
            "dtype",
            "backend",
            "step_ms",
            "experts_ms",
            "flexmoe_step_speedup",
            "flexmoe_experts_speedup",
            "experts_over_gemm_floor",
            "step_speedup_bound",
            "fp32_gflops",
            "bf16_gflops",
            "skipped",
        )
    print(format_table(rows, columns))
    env = environment(
        benchmark="hf",
        model=config,
        cpu_allocator=allocator,
        dist=args.dist,
        plan=args.plan,
        variants=variants if args.dist else None,
        adamw=args.adamw if args.dist else None,
        **timing,
    )
    payload = {"environment": env, "results": rows}
    out = args.out or f"bench_results/hf{'_dist' if args.dist else ''}.json"
    print(f"wrote {write_json(out, payload)}")
    return payload
