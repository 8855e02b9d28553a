"""`flexmoe bench layer`: one-process MoE layer against the einsum baseline, fairscale and three floors.

For each workload, in one run (same process, same threads):
- flexmoe: MoELayer forward+backward and forward-only (no_grad); like every forward+backward here,
  backward starts from a preallocated output gradient, so no loss's work blurs the layer's figure;
- padded: the same routing and experts but every capacity slot multiplied (dispatch -> [E, C, M]);
- einsum: flexmoe.baselines.GShardMoELayer (the Fairseq/GShard one-hot formulation), same weights;
- fairscale: fairscale.nn.MOELayer with Top2Gate, when installed and k == 2;
- expert ffn: the grouped expert FFN op alone (GEMMs, biases, activation) on the same kept rows, so
  that layer / expert ffn is what routing, dispatch and combine add on top of the experts;
- gemm floor: only the expert GEMMs (6 per expert for fwd+bwd, 2 for fwd) on exactly the kept rows;
- ffn floor: the gemm floor plus the passes no implementation of these experts avoids around its
  GEMMs: the activation forward and backward over the kept rows and, under autocast, casting the
  fp32 master weights to the compute dtype and their gradients back (biases, routing, dispatch and
  combine left out, so it stays a lower bound);
- peak floor: the FLOPs of those GEMMs over the rate of a large square matmul;
- working memory (`*_wm_mb`): the peak bytes one forward+backward (from a given output gradient)
  allocates above what was live before it (parameters, input), for flexmoe, the einsum layer and
  fairscale (flexmoe.bench.memory); parameter gradients count.

`--autocast bfloat16` runs every implementation on fp32 parameters under torch.autocast, and the
floors in bf16. The fp32 and bf16 square matmul rates are printed beside every figure, since what
bf16 gains depends on the machine (AMX / tensor cores) more than on the layer. `--memory` measures
only working memory, on one large layer: T=16,384 tokens, M=H=1,024, E=16 experts, top-2 (about 20 GB
of host memory in fp32, most of it the einsum layer's one-hot tensors).

Every step runs once per round, rounds repeat; times are medians and every ratio is the median of the
per-round ratios, so that a slow spell of this shared machine cancels out of the comparisons.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import socket
import statistics
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from flexmoe import MoELayer
from flexmoe.app.cli_args import (
    ArgumentParser,
    add_cpu_allocator_argument,
    apply_cpu_allocator,
    nonnegative_int,
    positive_int,
)
from flexmoe.app.reporting import environment, format_table
from flexmoe.baselines import GShardMoELayer
from flexmoe.bench import deepspeed_moe
from flexmoe.bench.common import (
    gemm_floor_steps,
    interleaved_times,
    matmul_rate_steps,
    paired_ratio,
    rates_from_times,
    square_matmul_step,
)
from flexmoe.bench.memory import working_memory
from flexmoe.bench.op_breakdown import op_breakdown
from flexmoe.core.dispatch import combine, dispatch
from flexmoe.core.routing import route
from flexmoe.json_file import write_json
from flexmoe.ops.amp import autocast_disabled
from flexmoe.ops.expert_ffn import activation_backward, activation_forward, grouped_expert_ffn


@dataclass(frozen=True, kw_only=True)
class LayerWorkload:
    model_dim: int
    hidden_dim: int
    num_experts: int
    top_k: int
    tokens: int
    capacity_factor: float

    @property
    def name(self) -> str:
        return (
            f"M{self.model_dim} H{self.hidden_dim} E{self.num_experts} k{self.top_k} "
            f"T{self.tokens} cf{self.capacity_factor:g}"
        )


WORKLOADS = (
    LayerWorkload(model_dim=512, hidden_dim=2048, num_experts=8, top_k=2, tokens=4096, capacity_factor=1.0),
    LayerWorkload(
        model_dim=1024, hidden_dim=4096, num_experts=16, top_k=1, tokens=8192, capacity_factor=1.25
    ),
    LayerWorkload(model_dim=512, hidden_dim=1024, num_experts=64, top_k=2, tokens=8192, capacity_factor=1.0),
)
MEMORY_WORKLOAD = LayerWorkload(
    model_dim=1024, hidden_dim=1024, num_experts=16, top_k=2, tokens=16384, capacity_factor=1.0
)
QUICK_WORKLOADS = (
    LayerWorkload(model_dim=32, hidden_dim=64, num_experts=4, top_k=2, tokens=128, capacity_factor=1.0),
    LayerWorkload(model_dim=32, hidden_dim=64, num_experts=8, top_k=1, tokens=128, capacity_factor=1.25),
)


def _autocast(device, dtype):
    """The precision context of every forward: torch.autocast to `dtype`, or nothing when None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _fwd(module, x, amp=contextlib.nullcontext):
    def step():
        with torch.no_grad(), amp():
            module(x)

    return step


def _padded_step(layer: MoELayer, x, *, backward: bool, dtype):
    """Same routing and experts, but every capacity slot is multiplied (the padded approach); the
    experts in `dtype` (the compute dtype), routing in fp32 as in MoELayer."""
    cfg = layer.config
    grad = torch.randn(x.shape, dtype=dtype, device=x.device)

    def forward():
        x_TM = x.reshape(-1, cfg.model_dim)
        with autocast_disabled(x.device.type):
            routing = route(layer.gate(x_TM), cfg.routing(training=layer.training), training=layer.training)
            buffer_ECM = dispatch(x_TM.to(dtype), routing, is_postscore=cfg.is_postscore)
            E, C, M = buffer_ECM.shape
            weights = layer.experts.local_weights(dtype)
            out = grouped_expert_ffn(buffer_ECM.reshape(E * C, M), weights, (C,) * E)
            return combine(out.view(E, C, M), routing, is_postscore=cfg.is_postscore)

    def step():
        if backward:
            layer.zero_grad(set_to_none=True)
            x.grad = None
            forward().backward(grad)
        else:
            with torch.no_grad():
                forward()

    return step


def _gemm_floor_steps(layer: MoELayer, kept: list[int], dtype, device):
    """Only the expert GEMMs on exactly the kept rows, with the same matmul library."""
    w = layer.experts
    return gemm_floor_steps(w.fc1_weight, w.fc2_weight, kept, hidden_dim=layer.config.hidden_dim, dtype=dtype)


def _ffn_floor_step(layer: MoELayer, kept: list[int], dtype, device):
    """The GEMM floor's fwd+bwd plus what these experts cannot avoid around their GEMMs (see the
    module docstring): the activation on the kept rows and the master weights' casts both ways."""
    masters = (layer.experts.fc1_weight.detach(), layer.experts.fc2_weight.detach())
    kind, M = layer.experts.activation, layer.config.model_dim
    rows = [torch.randn(n, M, dtype=dtype, device=device) for n in kept]
    grads = [torch.randn(n, M, dtype=dtype, device=device) for n in kept]

    def step():
        w1, w2 = (w.to(dtype) for w in masters)  # `to` returns the tensor itself without autocast
        g1, g2 = torch.empty_like(w1), torch.empty_like(w2)
        for e, (x, g) in enumerate(zip(rows, grads, strict=True)):
            h = x @ w1[e]
            act = activation_forward(kind, h)
            _ = act @ w2[e]
            torch.mm(act.t(), g, out=g2[e])
            gh = activation_backward(kind, g @ w2[e].t(), h, act)
            torch.mm(x.t(), gh, out=g1[e])
            _ = gh @ w1[e].t()
        return g1.to(masters[0].dtype), g2.to(masters[1].dtype)

    return step


def _expert_ffn_step(layer: MoELayer, kept: list[int], dtype, device):
    rows = torch.randn(sum(kept), layer.config.model_dim, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn_like(rows)

    def step():
        layer.zero_grad(set_to_none=True)
        rows.grad = None
        grouped_expert_ffn(rows, layer.experts.local_weights(dtype), tuple(kept)).backward(grad)

    return step


def _one_process_group() -> None:
    """fairscale and DeepSpeed-MoE need a process group, even for one process."""
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=0,
            world_size=1,
            timeout=datetime.timedelta(seconds=600),
        )


def _fairscale_layer(w: LayerWorkload, dtype):
    try:
        from fairscale.nn import MOELayer, Top2Gate
    except ImportError:
        return None
    if w.top_k != 2:
        return None
    _one_process_group()
    experts = torch.nn.ModuleList(
        torch.nn.Sequential(
            torch.nn.Linear(w.model_dim, w.hidden_dim),
            torch.nn.GELU(),
            torch.nn.Linear(w.hidden_dim, w.model_dim),
        )
        for _ in range(w.num_experts)
    )
    return MOELayer(Top2Gate(w.model_dim, w.num_experts), experts).to(dtype)


class _OutputOnly(torch.nn.Module):
    """DeepSpeed-MoE returns (y, aux loss); the steps here take y."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)[0]


def _deepspeed_layer(w: LayerWorkload, layer: MoELayer, dtype):
    """DeepSpeed-MoE with the layer's experts' activation, when deepspeed is installed."""
    if not deepspeed_moe.available():
        return None
    _one_process_group()
    module = deepspeed_moe.DeepSpeedMoE(
        model_dim=w.model_dim,
        hidden_dim=w.hidden_dim,
        num_experts=w.num_experts,
        top_k=w.top_k,
        capacity_factor=w.capacity_factor,
        activation=layer.experts.activation,
    )
    return _OutputOnly(module).to(dtype)


def _build(w: LayerWorkload, dtype, device):
    torch.manual_seed(0)
    kwargs = dict(top_k=w.top_k, capacity_factor=w.capacity_factor, seed=0, dtype=dtype)
    layer = MoELayer(w.model_dim, w.hidden_dim, w.num_experts, **kwargs).to(device)
    base = GShardMoELayer(w.model_dim, w.hidden_dim, w.num_experts, **kwargs).to(device)
    base.load_state_dict(layer.state_dict())
    # the input needs its gradient, as anywhere but in a model's first layer: every implementation pays
    # the GEMM back to the tokens (the sixth in the floor)
    x = torch.randn(w.tokens, w.model_dim, dtype=dtype, device=device, requires_grad=True)
    return layer, base, x


def _matmul_rates(device) -> tuple[dict, int]:
    """Square matmul steps in fp32 and bf16: the rates printed beside every figure."""
    return matmul_rate_steps(size=2048 if torch.device(device).type == "cpu" else 8192, device=device)


def _upstream_step(module, x, probe, amp):
    """Forward + backward from a preallocated output gradient: like the input, it is not working
    memory, and no loss's temporaries blur the layer's own figure. `probe`: a small valid input."""
    with torch.no_grad(), amp():
        dtype = module(probe).dtype  # e.g. the autocast dtype for MoELayer, x's for the einsum layer
    grad = torch.randn(x.shape, dtype=dtype, device=x.device)

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        with amp():
            y = module(x)
        y.backward(grad)

    return step


def _memory(result: dict, modules: dict, amp, device) -> None:
    """Working memory (MB) of each implementation's forward+backward, and flexmoe's saving vs einsum."""
    for impl, (module, x, probe) in modules.items():
        result[f"{impl}_wm_mb"] = working_memory(_upstream_step(module, x, probe, amp), device) / 1e6
    result["wm_saving_vs_einsum"] = 1 - result["flexmoe_wm_mb"] / result["einsum_wm_mb"]


def _memory_modules(w: LayerWorkload, layer, base, x, dtype, device) -> dict:
    """implementation -> (module, its input, a small valid input) for every implementation we run."""
    modules = {"flexmoe": (layer, x, x[:1]), "einsum": (base, x, x[:1])}
    fairscale = _fairscale_layer(w, dtype) if torch.device(device).type == "cpu" else None
    if fairscale is not None:  # fairscale takes [E, tokens / E, M] and needs a multiple of E rows
        xs = x.detach().view(w.num_experts, -1, w.model_dim).requires_grad_()
        modules["fairscale"] = (fairscale, xs, xs[:, :1])
    deepspeed = _deepspeed_layer(w, layer, dtype) if torch.device(device).type == "cpu" else None
    if deepspeed is not None:
        modules["deepspeed"] = (deepspeed, x, x[:1])
    return modules


def bench_workload(
    w: LayerWorkload,
    *,
    repeats: int,
    warmup: int,
    dtype,
    device,
    autocast=None,
    memory: bool = True,
    breakdown: bool = False,
) -> dict:
    layer, base, x = _build(w, dtype, device)
    low = autocast or dtype  # the experts' compute dtype
    amp = functools.partial(_autocast, device, autocast)
    with amp():
        layer(x)
    kept = layer.last_routing.kept_counts
    rows = sum(kept)

    square, square_flops = square_matmul_step(
        size=2048 if torch.device(device).type == "cpu" else 8192, dtype=low, device=device
    )
    rate_steps, rate_flops = _matmul_rates(device)
    floor_fb, floor_f = _gemm_floor_steps(layer, kept, low, device)
    steps = {
        "square_matmul_s": square,
        **rate_steps,
        "gemm_floor_fb_s": floor_fb,
        "gemm_floor_f_s": floor_f,
        "ffn_floor_fb_s": _ffn_floor_step(layer, kept, low, device),
        "expert_ffn_fb_s": _expert_ffn_step(layer, kept, low, device),
        "padded_fb_s": _padded_step(layer, x, backward=True, dtype=low),
        "padded_f_s": _padded_step(layer, x, backward=False, dtype=low),
    }
    modules = _memory_modules(w, layer, base, x, dtype, device)
    for impl, (module, module_x, probe) in modules.items():
        steps[f"{impl}_fb_s"] = _upstream_step(module, module_x, probe, amp)
        steps[f"{impl}_f_s"] = _fwd(module, module_x, amp)
    times = interleaved_times(steps, warmup=warmup, repeats=repeats, device=device)
    result = {"workload": w.name, **asdict(w), "capacity": layer.last_plan.capacity, "kept_rows": rows}
    result.update({name: statistics.median(ts) for name, ts in times.items()})
    result.update(rates_from_times(times, rate_flops))
    # peak floor: the kept rows' GEMM FLOPs at the square matmul's rate of the same rounds
    flops_fb = 12 * rows * w.model_dim * w.hidden_dim
    result["square_gflops"] = square_flops / result["square_matmul_s"] / 1e9
    result["peak_floor_fb_s"] = flops_fb / square_flops * result["square_matmul_s"]
    result["peak_floor_f_s"] = result["peak_floor_fb_s"] / 3
    result["gemm_efficiency"] = (
        flops_fb / square_flops * paired_ratio(times["square_matmul_s"], times["gemm_floor_fb_s"])
    )
    for impl in ("einsum", "fairscale", "deepspeed", "padded"):
        if f"{impl}_fb_s" in times:
            for mode in ("fb", "f"):
                result[f"speedup_vs_{impl}_{mode}"] = paired_ratio(
                    times[f"{impl}_{mode}_s"], times[f"flexmoe_{mode}_s"]
                )
    result["over_gemm_floor_fb"] = paired_ratio(times["flexmoe_fb_s"], times["gemm_floor_fb_s"])
    result["over_ffn_floor_fb"] = paired_ratio(times["flexmoe_fb_s"], times["ffn_floor_fb_s"])
    result["ffn_floor_over_gemm_floor_fb"] = paired_ratio(times["ffn_floor_fb_s"], times["gemm_floor_fb_s"])
    result["over_gemm_floor_f"] = paired_ratio(times["flexmoe_f_s"], times["gemm_floor_f_s"])
    result["over_expert_ffn_fb"] = paired_ratio(times["flexmoe_fb_s"], times["expert_ffn_fb_s"])
    result["expert_ffn_over_gemm_floor_fb"] = paired_ratio(times["expert_ffn_fb_s"], times["gemm_floor_fb_s"])
    if memory:
        _memory(result, modules, amp, device)
    if breakdown:  # flexmoe, the padded step and DeepSpeed-MoE cut alike (flexmoe.bench.op_breakdown)
        stepped = {"flexmoe": steps["flexmoe_fb_s"], "padded": steps["padded_fb_s"]}
        stepped.update({"deepspeed": steps["deepspeed_fb_s"]} if "deepspeed_fb_s" in steps else {})
        result["breakdown_ms"] = {impl: op_breakdown(step) for impl, step in stepped.items()}
    return result


def memory_workload(w: LayerWorkload, *, dtype, device, autocast=None) -> dict:
    """Working memory only (one forward+backward each), flexmoe against the einsum layer."""
    layer, base, x = _build(w, dtype, device)
    amp = functools.partial(_autocast, device, autocast)
    rate_steps, rate_flops = _matmul_rates(device)
    times = interleaved_times(rate_steps, warmup=1, repeats=3, device=device)
    result = {"workload": w.name, **asdict(w)}
    _memory(result, _memory_modules(w, layer, base, x, dtype, device), amp, device)
    result["capacity"] = layer.last_plan.capacity
    result.update(rates_from_times(times, rate_flops))
    return result


COLUMNS = (
    "workload",
    "flexmoe_fb_s",
    "flexmoe_f_s",
    "einsum_fb_s",
    "fairscale_fb_s",
    "padded_fb_s",
    "gemm_floor_fb_s",
    "ffn_floor_fb_s",
    "peak_floor_fb_s",
    "speedup_vs_fairscale_fb",
    "speedup_vs_einsum_fb",
    "speedup_vs_deepspeed_fb",
    "speedup_vs_padded_fb",
    "over_gemm_floor_fb",
    "over_gemm_floor_f",
    "ffn_floor_over_gemm_floor_fb",
    "over_ffn_floor_fb",
    "over_expert_ffn_fb",
    "expert_ffn_over_gemm_floor_fb",
    "gemm_efficiency",
    "square_gflops",
    "flexmoe_wm_mb",
    "einsum_wm_mb",
    "fairscale_wm_mb",
    "wm_saving_vs_einsum",
    "fp32_gflops",
    "bf16_gflops",
)
MEMORY_COLUMNS = (
    "workload",
    "flexmoe_wm_mb",
    "einsum_wm_mb",
    "fairscale_wm_mb",
    "wm_saving_vs_einsum",
    "fp32_gflops",
    "bf16_gflops",
)


def breakdown_table(by_impl: dict[str, dict[str, float]]) -> str:
    """One row per "phase: kind", one column (ms per fwd+bwd) per implementation."""
    keys = sorted({k for b in by_impl.values() for k in b if k != "total"}) + ["total"]
    rows = [{"ms per step": k, **{i: round(b.get(k, 0.0), 2) for i, b in by_impl.items()}} for k in keys]
    return format_table(rows, ("ms per step", *by_impl))


def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(
        prog="flexmoe bench layer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny workloads (smoke test)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed rounds")
    parser.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed rounds first")
    parser.add_argument("--out", default="bench_results/layer.json")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--autocast",
        choices=("none", "bfloat16", "float16"),
        default="none",
        help="run every implementation on --dtype parameters under torch.autocast to this dtype",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="only working memory, on T=16384 M=H=1024 E=16 top-2 (needs ~20 GB of host memory in fp32)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the working-memory columns")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="where flexmoe's, the padded and DeepSpeed-MoE's fwd+bwd spend their time, by kind of operator",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fairscale runs on cpu only)")
    parser.add_argument(
        "--only",
        type=nonnegative_int,
        action="append",
        help="only this workload (0-based; repeatable)",
    )
    add_cpu_allocator_argument(parser)
    args = parser.parse_args(argv)
    # --memory: the einsum layer alone needs ~16 GB there; retaining freed blocks would hold even more
    # (the figures come from allocation events and do not depend on it)
    allocator = apply_cpu_allocator("default" if args.memory else args.cpu_allocator)
    dtype = getattr(torch, args.dtype)
    autocast = None if args.autocast == "none" else getattr(torch, args.autocast)
    if autocast is not None and dtype != torch.float32:
        raise ValueError(
            f"--autocast needs --dtype float32 (fp32 master parameters), got --dtype {args.dtype}"
        )
    workloads = QUICK_WORKLOADS if args.quick else WORKLOADS
    if args.memory:
        workloads = QUICK_WORKLOADS[:1] if args.quick else (MEMORY_WORKLOAD,)
    if args.only:
        if max(args.only) >= len(workloads):
            parser.error(
                f"argument --only: must be below {len(workloads)} (the workloads), got {max(args.only)}"
            )
        workloads = [workloads[i] for i in args.only]
    rows = []
    for w in workloads:
        if args.memory:
            rows.append(memory_workload(w, dtype=dtype, device=args.device, autocast=autocast))
        else:
            rows.append(
                bench_workload(
                    w,
                    repeats=args.repeats,
                    warmup=args.warmup,
                    dtype=dtype,
                    device=args.device,
                    autocast=autocast,
                    memory=not args.no_memory,
                    breakdown=args.breakdown,
                )
            )
            if args.breakdown:
                print(breakdown_table(rows[-1]["breakdown_ms"]))
        print(f"done: {w.name}", flush=True)
    print(format_table(rows, MEMORY_COLUMNS if args.memory else COLUMNS))
    print(
        f"dtype {args.dtype}; autocast {args.autocast}; host allocator: {allocator}; ratios are medians "
        "of per-round ratios; *_wm_mb: working memory of one forward+backward (peak allocated above "
        "the parameters and input; flexmoe.bench.memory)"
    )
    payload = {
        "environment": environment(
            benchmark="layer",
            dtype=args.dtype,
            autocast=args.autocast,
            device=args.device,
            repeats=args.repeats,
            warmup=args.warmup,
            cpu_allocator=allocator,
        ),
        "results": rows,
    }
    path = write_json(args.out, payload)
    print(f"wrote {path}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return payload
