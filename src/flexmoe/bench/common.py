"""Shared benchmark plumbing: interleaved timing rounds, paired ratios, environment record, table, JSON."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "gemm_floor_steps",
    "interleaved_times",
    "matmul_rate_steps",
    "matmul_rates",
    "paired_ratio",
    "rates_from_times",
    "square_matmul_step",
    "synchronize",
]


def synchronize(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def interleaved_times(
    steps: dict[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 3, device=None
) -> dict[str, list[float]]:
    """Seconds of each step, measured in rounds that run every step once (A B C A B C ...), so that
    drift in a shared machine's speed does not favour whichever ran first."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of numerator / denominator: both ran in the same round, so a slow spell of
    the machine scales both and cancels, which a ratio of two medians does not guarantee."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def square_matmul_step(
    *, size: int = 2048, dtype=torch.float32, device="cpu"
) -> tuple[Callable[[], object], int]:
    """A large square matmul, the machine's practical peak rate, and its FLOPs."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    return (lambda: a @ b), 2 * size**3


RATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_rate_steps(*, size: int, device="cpu") -> tuple[dict[str, Callable[[], object]], int]:
    """Square matmul steps in fp32 and bf16 ("square_fp32_s", "square_bf16_s") to run among a
    benchmark's own steps, and their FLOPs each; rates_from_times turns their times into GFLOP/s."""
    steps, flops = {}, 0
    for name, dtype in RATE_DTYPES.items():
        steps[f"square_{name}_s"], flops = square_matmul_step(size=size, dtype=dtype, device=device)
    return steps, flops


def rates_from_times(times: dict[str, list[float]], flops: int) -> dict[str, float]:
    """{"fp32_gflops", "bf16_gflops"} from the median times of matmul_rate_steps' steps."""
    return {f"{n}_gflops": flops / statistics.median(times[f"square_{n}_s"]) / 1e9 for n in RATE_DTYPES}


def matmul_rates(*, size: int = 1024, repeats: int = 5, device="cpu") -> dict[str, float]:
    """fp32 and bf16 square matmul GFLOP/s (medians), timed on their own: printed beside the figures,
    since the bf16 rate differs by 1000x between the CPUs this project runs on."""
    steps, flops = matmul_rate_steps(size=size, device=device)
    return rates_from_times(interleaved_times(steps, warmup=1, repeats=repeats, device=device), flops)


def gemm_floor_steps(
    w1_GMX: torch.Tensor, w2_GHM: torch.Tensor, rows_G: list[int], *, hidden_dim: int, dtype
):
    """(fwd+bwd step, fwd step) of only the expert GEMMs on `rows_G[g]` rows of expert g (6 GEMMs per
    expert forward and backward, 2 forward), with the same matmul library the layers use: the work no
    implementation of these experts avoids. `hidden_dim`: H (fc1 may be 2H wide for swiglu)."""
    H, M = hidden_dim, w1_GMX.shape[1]
    w1 = w1_GMX.detach().to(dtype)
    w2 = w2_GHM.detach().to(dtype)
    device = w1.device
    rows = [torch.randn(n, M, dtype=dtype, device=device) for n in rows_G]
    grads = [torch.randn(n, M, dtype=dtype, device=device) for n in rows_G]
    hidden = [torch.randn(n, w1.shape[2], dtype=dtype, device=device) for n in rows_G]

    def forward():
        for e, x in enumerate(rows):
            h = x @ w1[e]
            _ = h[:, :H] @ w2[e]

    def forward_backward():
        for e, (x, g, h) in enumerate(zip(rows, grads, hidden, strict=True)):
            h1 = x @ w1[e]
            _ = h1[:, :H] @ w2[e]
            _ = h[:, :H].t() @ g  # grad fc2
            gh = g @ w2[e].t()  # grad hidden
            _ = x.t() @ gh  # grad fc1
            _ = gh @ w1[e][:, :H].t()  # grad x

    return forward_backward, forward
