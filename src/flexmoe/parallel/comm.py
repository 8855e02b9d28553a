"""Collectives for one MoE layer (DESIGN sections 3, 4, 5).

Device-agnostic: the same code drives gloo on CPU and NCCL on CUDA. Nothing here reads environment
variables; the number of ranks per node (for 2DH) is an argument.

Legend:
    W   ranks in the layer's group          L   ranks per node (local_world_size)
    N   nodes, N = W / L                    g   ranks in a block group (g consecutive group ranks)
    x_W...       an all-to-all buffer: block j goes to (and, after the exchange, came from) rank j
    x_LN...      the same blocks ordered by (destination local rank, destination node) for 2DH
    out_g...     a stack of the g shards gathered from a block group
"""

from __future__ import annotations

import atexit
import collections
import datetime
import functools
import time
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from flexmoe.core.layout import divisors
from flexmoe.ops.amp import amp_backward, amp_forward

ALGORITHMS = ("flat", "2dh")

__all__ = [
    "ALGORITHMS",
    "AllToAllHandle",
    "ExpertGroups",
    "FinishedWork",
    "WeakGroup",
    "all_gather_flat",
    "all_gather_shards",
    "all_reduce_max",
    "all_to_all",
    "all_to_all_rows",
    "control_device",
    "group_size_and_rank",
    "max_over_ranks",
]


# -- small helpers ---------------------------------------------------------------------------------


def group_size_and_rank(group: ProcessGroup | None) -> tuple[int, int]:
    """(ranks in `group`, this process's rank in it). None means WORLD when torch.distributed is
    initialised; without it (or without a group) a single process: (1, 0)."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _default_group(group: ProcessGroup | None) -> ProcessGroup | None:
    """None means WORLD when torch.distributed is initialised, else a single process (None)."""
    if group is None and dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return group


def all_gather_flat(
    out_flat: torch.Tensor, x_flat: torch.Tensor, group: ProcessGroup, *, finished: FinishedWork | None = None
) -> None:
    """`finished`: where the finished collective is kept (see FinishedWork); None: not kept."""
    # Newer torch renamed all_gather_into_tensor to all_gather_single (the old name warns);
    # both accept the 1-D concatenated form, which is also the only form gloo accepts.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    _run(functools.partial(fn, out_flat, x_flat, group=group), out_flat, finished)


def all_reduce_max(t: torch.Tensor, group: ProcessGroup, *, finished: FinishedWork | None = None) -> None:
    """t = its element-wise maximum over the group, in place. `finished`: as for all_gather_flat."""
    _run(functools.partial(dist.all_reduce, t, op=dist.ReduceOp.MAX, group=group), t, finished)


def _reduce_scatter_flat(
    out_flat: torch.Tensor, x_flat: torch.Tensor, group: ProcessGroup, *, finished: FinishedWork | None = None
) -> None:
    if x_flat.device.type == "cpu":
        # gloo's reduce_scatter costs as much as its all_reduce, 2-3x one all-to-all of the same
        # buffer (measured W = 2 and 4, 0.25-8 MiB): the all-to-all brings each rank the g parts of
        # its shard, summed here in rank order
        received = torch.empty_like(x_flat)
        _run(functools.partial(dist.all_to_all_single, received, x_flat, group=group), received, finished)
        torch.sum(received.view(dist.get_world_size(group), -1), 0, out=out_flat)
        return
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    _run(functools.partial(fn, out_flat, x_flat, op=dist.ReduceOp.SUM, group=group), out_flat, finished)


def _run(collective: Callable, out: torch.Tensor, finished: FinishedWork | None) -> None:
    """Run a collective to completion, through `finished` when given."""
    if finished is None:
        collective()
    else:
        finished.wait(collective(async_op=True), out)


def _inherited_timeout(group: ProcessGroup) -> datetime.timedelta | None:
    """The collective timeout `group` was created with, so subgroups fail as fast as it does.

    torch has no public getter; the backends keep it in their options. Returns None when it cannot
    be read, and new_group then falls back to torch's default (30 min gloo, 10 min NCCL).
    """
    for device in getattr(group, "_device_types", ()):
        try:
            timeout = group._get_backend(device).options._timeout
        except (AttributeError, RuntimeError):
            continue
        if isinstance(timeout, datetime.timedelta):
            return timeout
    return None


def control_device(group: ProcessGroup, device: torch.device | str | None) -> torch.device:
    """Where small control tensors must live: NCCL only moves CUDA tensors."""
    if device is not None:
        return torch.device(device)
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def max_over_ranks(values, group: ProcessGroup | None = None, *, device=None, finished=None):
    """Element-wise MAX over the group of floats (a list, or nested lists of equal lengths): the
    slowest rank's time, the same on every rank. One all-reduce; a single process gets `values` back.
    `finished`: where the finished all-reduce is kept (see FinishedWork)."""
    group = _default_group(group)
    if group is None or dist.get_world_size(group) == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=control_device(group, device))
    all_reduce_max(t, group, finished=finished)
    return t.tolist()


class WeakGroup:
    """A process group held weakly; calling it gives the group (or None for "no group").

    torch.distributed owns every group until destroy_process_group. A layer (or its tuner, or a
    strategy) that outlives that call must not keep a group alive: destroying a gloo group late, in
    the interpreter's teardown, can abort the process at exit ("terminate called without an active
    exception"). A group used after it was destroyed raises instead of hanging.
    """

    __slots__ = ("_ref",)

    def __init__(self, group: ProcessGroup | None) -> None:
        self._ref = None if group is None else weakref.ref(group)

    def __call__(self) -> ProcessGroup | None:
        if self._ref is None:
            return None
        group = self._ref()
        if group is None:
            raise RuntimeError(
                "this MoE layer's process group was destroyed (torch.distributed.destroy_process_group); "
                "build the layer again after init_process_group"
            )
        return group

    def __deepcopy__(self, memo) -> WeakGroup:
        return self  # a copy of a layer runs in the same groups

    def __reduce__(self):
        if self._ref is not None:
            raise TypeError(
                "a distributed MoE layer cannot be pickled (process groups live in one job); save it with "
                "flexmoe.checkpoint.save_checkpoint, or pickle a single-process copy"
            )
        return (WeakGroup, (None,))


class FinishedWork:
    """Holds the last few finished gloo collectives (their torch Work objects) a while longer.

    gloo's worker thread lets go of a Work only after waking its waiter. When Python dropped the Work
    first, the worker destroys it and its tensors, which needs the GIL; a worker still waiting for the
    GIL when the interpreter finalizes aborts the process ("terminate called without an active
    exception"), which is how a job that exits without destroy_process_group died. A Work kept here
    is freed by Python, on its own thread. A gloo worker holds one Work at a time, so the last few
    suffice; few, because each holds its buffers alive (16 kept several GB per rank of exchange
    buffers on a large model). NCCL frees no tensor on its own threads: its Works are not kept.
    What this cannot cover, a holder freed right after its last collective finished, is harmless
    until the exit, and there _let_gloo_workers_finish hands the workers the GIL in time.
    """

    __slots__ = ("_works",)

    def __init__(self, size: int = 4) -> None:
        self._works: collections.deque = collections.deque(maxlen=size)

    def wait(self, work, tensor: torch.Tensor) -> None:
        """Wait for `work`, a collective on `tensor`'s device; keep it when gloo ran it."""
        work.wait()
        if tensor.device.type == "cpu":  # gloo's (NCCL moves CUDA tensors only)
            self._works.append(work)

    def __len__(self) -> int:
        return len(self._works)

    def __deepcopy__(self, memo) -> FinishedWork:
        return FinishedWork(self._works.maxlen)  # a copy of a layer starts with nothing in flight

    def __reduce__(self):
        return (FinishedWork, (self._works.maxlen,))


# how long the interpreter's exit hands the GIL to gloo's workers (see _let_gloo_workers_finish)
_EXIT_GRACE_S = 0.05


def _let_gloo_workers_finish() -> None:
    """At exit, before the interpreter finalizes: a collective whose holder was freed right after it
    finished (a layer freed as its function returns, say) may still be in a gloo worker's hands, and
    the worker needs the GIL to free it. Sleeping hands the GIL over while that is still allowed."""
    if dist.is_available() and dist.is_initialized() and "gloo" in str(dist.get_backend()):
        time.sleep(_EXIT_GRACE_S)


def _at_exit_let_gloo_workers_finish() -> None:
    atexit.unregister(_let_gloo_workers_finish)  # registered once, however many groups are built
    atexit.register(_let_gloo_workers_finish)


# -- asynchronous all-to-all -----------------------------------------------------------------------


class AllToAllHandle:
    """An all-to-all in flight; `wait()` returns the received buffer (same shape as the sent one).

    `finish` completes the exchange; it runs once, later calls return the cached result. The handle
    keeps the send buffer alive until then, so the allocator cannot reuse it while it is on the wire.
    """

    def __init__(self, finish: Callable[[], torch.Tensor], keep_alive: tuple[torch.Tensor, ...] = ()):
        self._finish: Callable[[], torch.Tensor] | None = finish
        self._keep_alive = keep_alive
        self._result: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        if self._finish is not None:
            self._result = self._finish()
            self._finish = None
            self._keep_alive = ()
        assert self._result is not None
        return self._result


class ExpertGroups:
    """All process groups one MoE layer needs, created once, eagerly, in the same order on every rank.

    Constructing it is a collective call on every rank of `group`. `group=None` means WORLD when
    torch.distributed is initialised, else a single process (world_size 1, rank 0, no collectives).

    Subgroups: for every divisor r of `shards_per_expert` (s), the groups of s / r consecutive group
    ranks used by plan r (DESIGN section 3); with a valid `local_world_size` L (1 < L < W, W % L == 0)
    also the intra-node groups (ranks n*L .. n*L+L-1) and inter-node groups (ranks l, L+l, 2L+l, ...)
    of the two-dimensional hierarchical all-to-all (section 5). Rank sets that coincide share one
    process group. `finished`: where finished collectives are kept (see FinishedWork; None: a new one).
    """

    def __init__(
        self,
        group: ProcessGroup | None = None,
        *,
        shards_per_expert: int = 1,
        local_world_size: int | None = None,
        timeout: datetime.timedelta | None = None,
        finished: FinishedWork | None = None,
    ) -> None:
        if not _is_positive_int(shards_per_expert):
            raise ValueError(f"shards_per_expert must be a positive integer, got {shards_per_expert!r}")
        if local_world_size is not None and not _is_positive_int(local_world_size):
            raise ValueError(f"local_world_size must be a positive integer or None, got {local_world_size!r}")
        if timeout is not None and not isinstance(timeout, datetime.timedelta):
            raise ValueError(f"timeout must be a datetime.timedelta or None, got {timeout!r}")

        group = _default_group(group)
        self._group = WeakGroup(group)  # held weakly, as are the subgroups (see WeakGroup)
        # every collective of these groups is waited through it (the owner's, when given)
        self.finished = FinishedWork() if finished is None else finished
        self.world_size, self.rank = group_size_and_rank(group)
        self.shards_per_expert = shards_per_expert
        self.local_world_size = local_world_size
        W, L = self.world_size, local_world_size
        if W % shards_per_expert:
            raise ValueError(
                f"shards_per_expert={shards_per_expert} must divide the group size {W} "
                "(s = W / E ranks share one expert)"
            )

        self._blocks: dict[int, WeakGroup] = {1: WeakGroup(None), W: WeakGroup(group)}
        # this rank's 2DH groups: same node / same local rank (None without 2DH)
        self._intra_node = self._inter_node = WeakGroup(None)
        self._supports_2dh = L is not None and 1 < L < W and W % L == 0
        if group is None or W == 1:
            return

        self._timeout = timeout if timeout is not None else _inherited_timeout(group)
        _at_exit_let_gloo_workers_finish()
        # new_group on a rank set is a collective over the whole job, so it is called for every
        # subgroup on every rank, in one fixed order; a dict keyed by rank set dedupes (e.g. the
        # blocks of size L are the intra-node groups).
        self._cache: dict[tuple[int, ...], ProcessGroup | None] = {}
        for size in sorted({s for s in divisors(shards_per_expert) if 1 < s < W}):
            blocks = [list(range(start, start + size)) for start in range(0, W, size)]
            self._blocks[size] = WeakGroup(self._create_partition(blocks))
        if self._supports_2dh:
            assert L is not None
            nodes = W // L
            intra = self._create_partition([[n * L + l for l in range(L)] for n in range(nodes)])
            inter = self._create_partition([[n * L + l for n in range(nodes)] for l in range(L)])
            self._intra_node, self._inter_node = WeakGroup(intra), WeakGroup(inter)
        del self._cache

    def _create_partition(self, partition: list[list[int]]) -> ProcessGroup | None:
        """Create every group of a partition of the group ranks; return the one holding this rank."""
        mine = None
        for members in partition:
            pg = self._new_group(members)
            if self.rank in members:
                mine = pg
        assert mine is not None
        return mine

    def _new_group(self, group_ranks: list[int]) -> ProcessGroup | None:
        assert self.group is not None
        global_ranks = [dist.get_global_rank(self.group, i) for i in group_ranks]
        key = tuple(global_ranks)
        if key in self._cache:
            return self._cache[key]
        kwargs: dict = {"ranks": global_ranks}
        if self._timeout is not None:
            kwargs["timeout"] = self._timeout
        if global_ranks != sorted(global_ranks):
            # Group-rank order must survive: it is the block order of the all-to-all.
            kwargs["sort_ranks"] = False
        if dist.get_world_size(self.group) != dist.get_world_size():
            # `group` is a strict subgroup of the job: ranks outside it never build this object, so
            # only members may take part in creating its subgroups.
            kwargs["use_local_synchronization"] = True
        pg = dist.new_group(**kwargs)
        self._cache[key] = pg
        return pg

    # -- queries -----------------------------------------------------------------------------------
    @property
    def group(self) -> ProcessGroup | None:
        """The layer's whole group (None on a single process)."""
        return self._group()

    @property
    def intra_node(self) -> ProcessGroup | None:
        """This rank's 2DH group of the same node (None without 2DH)."""
        return self._intra_node()

    @property
    def inter_node(self) -> ProcessGroup | None:
        """This rank's 2DH group of the same local rank (None without 2DH)."""
        return self._inter_node()

    @property
    def supports_2dh(self) -> bool:
        """Whether the "2dh" all-to-all can run: local_world_size L with 1 < L < W and W % L == 0."""
        return self._supports_2dh

    @property
    def node_size(self) -> int | None:
        """Ranks per node where the groups span nodes (2DH runs: L), else None: one node holds them."""
        return self.local_world_size if self._supports_2dh else None

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Sizes `block_group` accepts."""
        return tuple(sorted(self._blocks))

    def block_group(self, size: int) -> ProcessGroup | None:
        """The group of `size` consecutive ranks holding this rank; None when size is 1 (no traffic)."""
        if size not in self._blocks:
            raise ValueError(
                f"block group size must be one of {self.block_sizes} (divisors of "
                f"shards_per_expert={self.shards_per_expert}, and the world size), got {size!r}"
            )
        return self._blocks[size]()

    # -- all-to-all --------------------------------------------------------------------------------
    def _check_algorithm(self, algorithm: str) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"all_to_all must be one of {ALGORITHMS}, got {algorithm!r}")
        if algorithm == "2dh" and not self._supports_2dh:
            raise ValueError(
                f'all_to_all="2dh" needs local_world_size L with 1 < L < W and W % L == 0 '
                f"(W={self.world_size}), got local_world_size={self.local_world_size}"
            )

    def all_to_all_start(
        self, x: torch.Tensor, algorithm: str, *, out: torch.Tensor | None = None
    ) -> AllToAllHandle:
        """Start exchanging x_W... (block j to rank j); `handle.wait()` gives the received blocks, in
        `out` when given (a contiguous tensor of x's shape: e.g. one chunk of a larger buffer, so that
        the chunks need no concatenation)."""
        self._check_algorithm(algorithm)
        if x.dim() == 0 or x.shape[0] != self.world_size:
            raise ValueError(
                f"all-to-all buffer must have W={self.world_size} as its first dimension, "
                f"got shape {tuple(x.shape)}"
            )
        if out is not None and (out.shape != x.shape or not out.is_contiguous()):
            raise ValueError(f"out must be contiguous, of x's shape {tuple(x.shape)}; got {tuple(out.shape)}")
        if self.world_size == 1 or x.numel() == 0:
            # Nothing to move; every rank holds the same (agreed) shape, so all skip together.
            return AllToAllHandle(lambda: x if out is None else out.copy_(x))
        x = x.contiguous()
        if algorithm == "flat":
            out = torch.empty_like(x) if out is None else out
            work = dist.all_to_all_single(out, x, group=self.group, async_op=True)

            def finish_flat() -> torch.Tensor:
                self.finished.wait(work, out)
                return out

            return AllToAllHandle(finish_flat, (x,))
        return self._start_2dh(x, out)

    def all_to_all_rows_start(
        self,
        x_RM: torch.Tensor,
        send_rows: Sequence[int],
        recv_rows: Sequence[int],
        *,
        out: torch.Tensor | None = None,
    ) -> AllToAllHandle:
        """Start a flat all-to-all of rows of any count: x_RM's first send_rows[0] rows to rank 0, the
        next send_rows[1] to rank 1, ...; `handle.wait()` gives the recv_rows[j] rows from each rank j,
        in rank order, in `out` when given (contiguous, sum(recv_rows) rows). Every rank's recv_rows[j]
        must be rank j's send_rows[me] (the callers exchange the counts first)."""
        W = self.world_size
        if len(send_rows) != W or len(recv_rows) != W:
            raise ValueError(
                f"send_rows and recv_rows must hold W={W} counts, got {len(send_rows)} and {len(recv_rows)}"
            )
        if sum(send_rows) != x_RM.shape[0]:
            raise ValueError(f"send_rows must sum to x's {x_RM.shape[0]} rows, got {list(send_rows)}")
        shape = (sum(recv_rows), *x_RM.shape[1:])
        if out is None:
            out = x_RM.new_empty(shape)
        elif out.shape != shape or not out.is_contiguous():
            raise ValueError(f"out must be contiguous, of shape {shape}; got {tuple(out.shape)}")
        if W == 1:
            return AllToAllHandle(lambda: out.copy_(x_RM))
        x_RM = x_RM.contiguous()
        work = dist.all_to_all_single(
            out,
            x_RM,
            output_split_sizes=list(recv_rows),
            input_split_sizes=list(send_rows),
            group=self.group,
            async_op=True,
        )

        def finish() -> torch.Tensor:
            self.finished.wait(work, out)
            return out

        return AllToAllHandle(finish, (x_RM,))

    def _start_2dh(self, x_W: torch.Tensor, out: torch.Tensor | None) -> AllToAllHandle:
        L = self.local_world_size
        assert L is not None
        N = self.world_size // L
        rest = x_W.shape[1:]
        # Block j = n' * L + l' goes to local rank l' of node n'. Group by destination local rank so
        # one intra-node message to local peer l' carries everything bound for (n', l'), all n'.
        send_LN = x_W.view(N, L, *rest).transpose(0, 1).contiguous()
        recv_LN = torch.empty_like(send_LN)  # [source local rank, destination node, ...]
        work = dist.all_to_all_single(recv_LN, send_LN, group=self.intra_node, async_op=True)

        def finish_2dh() -> torch.Tensor:
            self.finished.wait(work, recv_LN)
            # Now order by destination node: one inter-node message per node, among equal local ranks.
            send_NL = recv_LN.transpose(0, 1).contiguous()
            # [source node, source local rank, ...] = source rank
            recv_NL = torch.empty_like(send_NL) if out is None else out.view(send_NL.shape)
            inter = dist.all_to_all_single(recv_NL, send_NL, group=self.inter_node, async_op=True)
            self.finished.wait(inter, recv_NL)
            return recv_NL.view(self.world_size, *rest)

        return AllToAllHandle(finish_2dh, (send_LN,))


# -- differentiable wrappers -----------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    # moves data only: x travels in its own dtype (low precision when the layer cast it under autocast)
    @staticmethod
    @amp_forward(cast_inputs=False)
    def forward(ctx, x: torch.Tensor, groups: ExpertGroups, algorithm: str) -> torch.Tensor:
        ctx.groups, ctx.algorithm = groups, algorithm
        return groups.all_to_all_start(x, algorithm).wait()

    @staticmethod
    @amp_backward
    def backward(ctx, grad_W: torch.Tensor):
        # out_i[j] = in_j[i] is its own transpose: the gradient goes back by the same exchange.
        return ctx.groups.all_to_all_start(grad_W.contiguous(), ctx.algorithm).wait(), None, None


def all_to_all(x: torch.Tensor, groups: ExpertGroups, algorithm: str = "flat") -> torch.Tensor:
    """Differentiable all-to-all of x_W... over `groups` ("flat" or "2dh"; bit-identical results)."""
    if groups.world_size == 1:
        groups._check_algorithm(algorithm)
        if x.dim() == 0 or x.shape[0] != 1:
            raise ValueError(f"all-to-all buffer must have W=1 as its first dimension, got {tuple(x.shape)}")
        return x
    return _AllToAll.apply(x, groups, algorithm)


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    @amp_forward(cast_inputs=False)
    def forward(ctx, x_RM: torch.Tensor, groups: ExpertGroups, send_rows: tuple, recv_rows: tuple):
        ctx.groups, ctx.send_rows, ctx.recv_rows = groups, send_rows, recv_rows
        return groups.all_to_all_rows_start(x_RM, send_rows, recv_rows).wait()

    @staticmethod
    @amp_backward
    def backward(ctx, grad_RM: torch.Tensor):
        # the rows came back the way they went: the gradient takes the exchange with the counts swapped
        grad = ctx.groups.all_to_all_rows_start(grad_RM.contiguous(), ctx.recv_rows, ctx.send_rows).wait()
        return grad, None, None, None


def all_to_all_rows(
    x_RM: torch.Tensor, groups: ExpertGroups, send_rows: Sequence[int], recv_rows: Sequence[int]
) -> torch.Tensor:
    """Differentiable flat all-to-all of rows of any count (see ExpertGroups.all_to_all_rows_start)."""
    return _AllToAllRows.apply(x_RM, groups, tuple(send_rows), tuple(recv_rows))


class _AllGatherShards(torch.autograd.Function):
    # casts explicitly (to `dtype`), so it needs no autocast casting of its own
    @staticmethod
    @amp_forward(cast_inputs=False)
    def forward(ctx, x: torch.Tensor, group: ProcessGroup, dtype: torch.dtype) -> torch.Tensor:
        ctx.group, ctx.shard_dtype = group, x.dtype
        ctx.finished = FinishedWork(2)  # the graph keeps both collectives' Works (see FinishedWork)
        g = dist.get_world_size(group)
        x = x.to(dtype).contiguous()  # gathered in `dtype`: bf16 moves half the bytes of fp32
        out_g = torch.empty((g, *x.shape), dtype=dtype, device=x.device)
        # the kept Work holds the buffer it wrote: detached, or it would reach out_g's autograd node, and
        # node -> ctx.finished -> Work -> out_g -> node is a cycle through C++ that Python's garbage
        # collector cannot see, leaking every step's gathered weights
        all_gather_flat(out_g.detach().view(-1), x.view(-1), group, finished=ctx.finished)
        return out_g

    @staticmethod
    @amp_backward
    def backward(ctx, grad_g: torch.Tensor):
        # Every rank used every shard: a shard's gradient is the sum of all g ranks' contributions,
        # summed in the shard's (master) dtype so that adding W low-precision terms loses no bits.
        grad_g = grad_g.to(ctx.shard_dtype).contiguous()
        grad = torch.empty(grad_g.shape[1:], dtype=grad_g.dtype, device=grad_g.device)
        _reduce_scatter_flat(grad.view(-1), grad_g.view(-1), ctx.group, finished=ctx.finished)
        return grad, None, None


def all_gather_shards(
    x: torch.Tensor, group: ProcessGroup | None, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Stack the g ranks' shards: [*shape] -> [g, *shape]; backward reduce-scatters (SUM) the grads.

    `dtype` (default x's): the dtype gathered and returned; the gradients are reduce-scattered in
    x's dtype. `group=None` is a block of one rank (see `ExpertGroups.block_group`): x.unsqueeze(0).
    """
    dtype = dtype or x.dtype
    if group is None or dist.get_world_size(group) == 1:
        return x.to(dtype).unsqueeze(0)
    return _AllGatherShards.apply(x, group, dtype)
