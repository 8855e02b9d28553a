"""Row indices made of runs, built on the device from sizes the host already holds.

The exchange and the grouped FFN know their row counts on the host (one `.tolist()` per forward,
parallel.chunks); the indices that regroup or pad rows follow from them. On a GPU, building those
indices must not stall the launch queue again: no op whose output shape depends on values
(`nonzero`, `repeat_interleave` without `output_size`), and the host numbers are copied from pinned
memory without waiting (a plain `torch.tensor(..., device="cuda")` synchronises the stream).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import torch


def host_ints_to(values: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """Rows of host ints (equal lengths) as one int64 tensor on `device`; to a GPU without a host sync."""
    t = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return t.to(device)
    # pinned, the copy need not wait; PyTorch's host allocator keeps the block until the copy ends
    return t.pin_memory().to(device, non_blocking=True)


def starts_of(lengths: Sequence[int]) -> list[int]:
    """Where each of consecutive runs of these lengths starts: [0, n_0, n_0 + n_1, ...] (host ints)."""
    return list(accumulate(lengths, initial=0))[:-1]


def concatenated_runs(starts: Sequence[int], lengths: Sequence[int], device: torch.device) -> torch.Tensor:
    """[s_0, s_0 + 1, ..., s_0 + n_0 - 1, s_1, ...]: run k (start s_k, n_k >= 0 values) after run k - 1."""
    if len(starts) != len(lengths) or min(lengths, default=0) < 0:
        raise ValueError(
            f"starts and lengths must pair up, lengths >= 0: got {len(starts)} starts, {list(lengths)}"
        )
    total = sum(lengths)
    # value j of the result = base of its run + j, base_k = s_k - (values before run k)
    before = starts_of(lengths)
    bases = [s - b for s, b in zip(starts, before, strict=True)]
    base_K, length_K = host_ints_to([bases, list(lengths)], device)
    return torch.repeat_interleave(base_K, length_K, output_size=total) + torch.arange(total, device=device)


def expert_major(received_WL: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """Rows that arrived sender-major (sender w's received_WL[w][l] rows for expert l, in sender, then
    expert order) listed expert-major: for each expert, sender 0's run, then sender 1's, ..."""
    W = len(received_WL)
    L = len(received_WL[0]) if W else 0
    start_WL = starts_of([rows for sender in received_WL for rows in sender])
    order = [(w, l) for l in range(L) for w in range(W)]
    return concatenated_runs(
        [start_WL[w * L + l] for w, l in order], [received_WL[w][l] for w, l in order], device
    )


__all__ = ["concatenated_runs", "expert_major", "host_ints_to", "starts_of"]
