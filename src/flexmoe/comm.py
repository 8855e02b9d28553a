"""Collectives for one MoE layer: process groups, async all-to-all (flat and 2DH), differentiable
all-to-all and shard all-gather, and rank agreement checks. Works on gloo (CPU) and NCCL (CUDA).

Legend: W ranks in the layer's group, L ranks per node, N = W / L nodes, B one rank's block.
All-to-all buffers are [W, ...]: block j goes to rank j; received block j came from rank j.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flexmoe.layout import divisors

# torch >= 2.13 renamed the flat-tensor collectives; older releases only have the *_tensor names
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


class _Done:
    """A finished 'collective' (single process): wait() just returns the buffer."""

    def __init__(self, result: torch.Tensor):
        self.result = result

    def wait(self) -> torch.Tensor:
        return self.result


class _FlatAllToAll:
    def __init__(self, x: torch.Tensor, group):
        self.result = torch.empty_like(x)
        self.work = dist.all_to_all_single(self.result, x, group=group, async_op=True)

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.result


class _TwoDimAllToAll:
    """Intra-node all-to-all (started at once), layout transform, inter-node all-to-all (in wait)."""

    def __init__(self, x: torch.Tensor, groups: ExpertGroups):
        W, L = groups.world_size, groups.local_world_size
        N = W // L
        self.groups, self.shape = groups, x.shape
        # [N dest node, L dest local, B] -> [L dest local, N dest node, B]: what goes to each local peer
        by_local_dest = x.reshape(N, L, -1).transpose(0, 1).contiguous()
        self.stage = _FlatAllToAll(by_local_dest, groups.intra_node)

    def wait(self) -> torch.Tensor:
        W, L = self.groups.world_size, self.groups.local_world_size
        N = W // L
        # received [L src local, N dest node, B] -> [N dest node, L src local, B] for the inter phase
        by_node = self.stage.wait().view(L, N, -1).transpose(0, 1).contiguous()
        # received [N src node, L src local, B] == source rank order n * L + l
        return _FlatAllToAll(by_node, self.groups.inter_node).wait().view(self.shape)


class ExpertGroups:
    """The process groups one layer needs, built once on every rank of `group` (a collective call)."""

    def __init__(
        self,
        group=None,
        *,
        shards_per_expert: int = 1,
        local_world_size: int | None = None,
        timeout: datetime.timedelta | None = None,
    ):
        self.distributed = _initialized()
        self.group = group if group is not None or not self.distributed else dist.group.WORLD
        self.world_size = dist.get_world_size(self.group) if self.distributed else 1
        self.rank = dist.get_rank(self.group) if self.distributed else 0
        self.local_world_size = local_world_size
        W = self.world_size
        self._blocks: dict[int, object] = {1: None, W: self.group}
        self.intra_node = self.inter_node = None
        if W == 1:
            return
        to_global = [dist.get_global_rank(self.group, i) for i in range(W)]

        def new_group(ranks: list[int]):
            return dist.new_group(ranks=[to_global[i] for i in ranks], timeout=timeout)

        # every rank calls new_group for every subgroup, in the same order
        for size in sorted(set(divisors(shards_per_expert)) - {1, W}):
            for start in range(0, W, size):
                g = new_group(list(range(start, start + size)))
                if start <= self.rank < start + size:
                    self._blocks[size] = g
        if self.supports_2dh:
            L = local_world_size
            for n in range(W // L):
                g = new_group(list(range(n * L, (n + 1) * L)))
                if n == self.rank // L:
                    self.intra_node = g
            for l in range(L):
                g = new_group(list(range(l, W, L)))
                if l == self.rank % L:
                    self.inter_node = g

    @property
    def supports_2dh(self) -> bool:
        L, W = self.local_world_size, self.world_size
        return L is not None and 1 < L < W and W % L == 0

    def block_group(self, size: int):
        """The group of `size` consecutive ranks holding this rank (None for 1: nothing to talk to)."""
        if size not in self._blocks:
            raise ValueError(f"no block group of size {size}; sizes built: {sorted(self._blocks)}")
        return self._blocks[size]

    def all_to_all_start(self, x: torch.Tensor, algorithm: str):
        """Start an all-to-all of x [W, ...] (contiguous); `.wait()` returns the received [W, ...]."""
        if x.shape[0] != self.world_size:
            raise ValueError(f"all-to-all buffer must start with W={self.world_size}, got {tuple(x.shape)}")
        if self.world_size == 1:
            return _Done(x)
        if algorithm == "flat":
            return _FlatAllToAll(x.contiguous(), self.group)
        if algorithm == "2dh":
            if not self.supports_2dh:
                raise ValueError(
                    f"all_to_all='2dh' needs local_world_size L with 1 < L < W={self.world_size} and "
                    f"W % L == 0, got local_world_size={self.local_world_size}"
                )
            return _TwoDimAllToAll(x.contiguous(), self)
        raise ValueError(f"all_to_all must be one of ('flat', '2dh'), got {algorithm!r}")


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, groups: ExpertGroups, algorithm: str):
        ctx.groups, ctx.algorithm = groups, algorithm
        return groups.all_to_all_start(x.contiguous(), algorithm).wait()

    @staticmethod
    def backward(ctx, grad):
        # an all-to-all is a permutation across ranks whose transpose is the same exchange
        return ctx.groups.all_to_all_start(grad.contiguous(), ctx.algorithm).wait(), None, None


def all_to_all(x: torch.Tensor, groups: ExpertGroups, algorithm: str = "flat") -> torch.Tensor:
    """Differentiable all-to-all of x [W, ...]."""
    return _AllToAll.apply(x, groups, algorithm)


class _AllGatherShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, size: int):
        ctx.group = group
        out = x.new_empty(size * x.numel())  # flat: gloo wants the concatenation, not a stack
        _all_gather_flat(out, x.contiguous().view(-1), group=group)
        return out.view(size, *x.shape)

    @staticmethod
    def backward(ctx, grad):
        # ZeRO-style: each shard receives the sum of the gradients every rank computed for its copy
        out = grad.new_empty(grad[0].numel())
        _reduce_scatter_flat(out, grad.contiguous().view(-1), op=dist.ReduceOp.SUM, group=ctx.group)
        return out.view(grad.shape[1:]), None, None


def all_gather_shards(x: torch.Tensor, group) -> torch.Tensor:
    """[...] on each of g ranks -> [g, ...] everywhere; backward reduce-scatters (sum)."""
    if group is None:
        return x.unsqueeze(0)
    return _AllGatherShards.apply(x, group, dist.get_world_size(group))


def agree_max(values: list[int], group=None, *, device=None) -> list[int]:
    """All-reduce MAX of small ints (e.g. the capacity every rank must use)."""
    if not _initialized() or dist.get_world_size(group) == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


@dataclass(frozen=True)
class Disagreement:
    key: str
    low: int
    high: int


def check_agreement(values: dict[str, int], group=None, *, device=None) -> None:
    """Every rank must hold the same values; one all-reduce (MAX over [v, -v]) finds who differs, and
    every rank raises the same ValueError instead of hanging in a mismatched collective."""
    if not _initialized() or dist.get_world_size(group) == 1:
        return
    keys = list(values)
    v = torch.tensor([values[k] for k in keys], dtype=torch.int64, device=device)
    both = torch.cat([v, -v])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    high, low = both[: len(keys)].tolist(), (-both[len(keys) :]).tolist()
    bad = [Disagreement(k, lo, hi) for k, lo, hi in zip(keys, low, high, strict=True) if lo != hi]
    if bad:
        detail = ", ".join(f"{d.key} (min {d.low}, max {d.high})" for d in bad)
        raise ValueError(f"ranks disagree on {detail}")
