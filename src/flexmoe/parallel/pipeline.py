"""All-to-all overlapped with expert compute in d capacity chunks, forward and backward (DESIGN 4).

Legend: W ranks, L local experts (E_local), E = W * L, d chunks, c rows per (rank, local expert) in
a chunk (Cp = d * c capacity rows in all), M model dim, R = L * W * c rows of a received chunk, N of
them hold a token.

    send [d, W, L, c, M] --a2a of chunk i--> recv [W, L, c, M] --> flexible layout [L, W * c, M]
      --> filled rows only --> expert FFN --> [W, L, c, M] --a2a back--> ret[i] of ret [d, W, L, c, M]

The send buffer is chunk-major (`chunk_major_rows` says where each row of [W, L, Cp] goes): each
chunk is one contiguous block that the all-to-all sends as it is and receives into its place, so no
chunk is copied out before sending nor concatenated after receiving.

All d chunk all-to-alls are started asynchronously up front; while the experts compute chunk i the
later chunks are in flight, and chunk i's return all-to-all overlaps the compute of chunk i + 1.
Backward runs the same schedule on the gradients (the adjoint of an all-to-all is an all-to-all),
accumulating the weight gradients chunk by chunk. Results do not depend on d.

Capacity slots that no token filled are never multiplied: the filled rows of every (sender, local
expert, chunk) are a prefix (routing fills slots in order), so the senders' row counts, exchanged by
one small all-to-all started together with the data chunks, say exactly which received rows to pack.

Other work can run beside the exchange (`beside`: the layer's shared experts): StartExchange starts the
chunks, the work runs, PipelinedExpertExchange waits; in backward the engine runs the work's backward
between PipelinedExpertExchange.backward starting the gradient chunks and StartExchange.backward
waiting for them (tests/parallel/test_shared_overlap.py records that order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from flexmoe.ops.amp import amp_backward, amp_forward
from flexmoe.ops.expert_ffn import ExpertWeights, ffn_backward, ffn_forward, pays_to_pad


def _to_flexible(recv_WLcM: torch.Tensor) -> torch.Tensor:
    """[W, L, c, M] -> [L * W * c, M]: each local expert's rows from every rank contiguous, so the
    expert GEMMs keep one large shape at any W."""
    W, L, c, M = recv_WLcM.shape
    return recv_WLcM.permute(1, 0, 2, 3).reshape(L * W * c, M)


def _from_flexible(rows: torch.Tensor, W: int, L: int, c: int) -> torch.Tensor:
    return rows.view(L, W, c, -1).permute(1, 0, 2, 3).contiguous()


def chunk_major_rows(row_N: torch.Tensor, *, blocks: int, block_rows: int, d: int) -> torch.Tensor:
    """Where rows of a [blocks, block_rows] buffer (blocks = W * L, rank-major) go in the chunk-major
    [d, blocks, c] one (c = block_rows / d): chunk i holds rows i * c .. i * c + c - 1 of every block."""
    c = block_rows // d
    block, position = row_N // block_rows, row_N % block_rows
    return (position // c * blocks + block) * c + position % c


@dataclass(frozen=True)
class FilledRows:
    """The rows of one received chunk, in the flexible layout [L * W * c], that the experts multiply:
    those that hold a token, and, when every local expert is padded to the same row count (small,
    nearly equal groups: ops.expert_ffn.pays_to_pad), some empty ones, so that the grouped FFN runs as
    one batched GEMM. Empty rows are zeros from the sender; their outputs go back to slots the sender
    never reads, and their gradients are zeros, so the padding changes no result."""

    index: torch.Tensor | None  # rows multiplied, in the flexible layout; None: every row
    sizes: tuple[int, ...]  # rows per local expert, the grouped FFN's group sizes
    source: torch.Tensor | None = None  # the same rows in the received [W, L, c] layout

    @staticmethod
    def from_counts(filled_WL: torch.Tensor, c: int, hidden_width: int) -> FilledRows:
        """filled_WL: rows of the chunk that sender w filled for local expert l (a prefix of its c);
        hidden_width: the experts' fc1 width (what a row costs in the activation's memory)."""
        W, L = filled_WL.shape
        sizes = tuple(int(n) for n in filled_WL.sum(0).tolist())
        if sum(sizes) == L * W * c:
            return FilledRows(None, sizes)
        take_LWc = torch.arange(c, device=filled_WL.device) < filled_WL.t().unsqueeze(-1)
        n = max(sizes)
        if pays_to_pad(L * n - sum(sizes), sum(sizes), n * hidden_width):
            if n == W * c:  # padded to every row: nothing to pack
                return FilledRows(None, (n,) * L)
            # each expert also takes its first n - size empty rows (distinct rows: no index repeats)
            need_L11 = torch.tensor([n - s for s in sizes], device=filled_WL.device).view(L, 1, 1)
            empty_LWc = ~take_LWc
            rank_LWc = empty_LWc.reshape(L, -1).cumsum(1).view(L, W, c)
            take_LWc = take_LWc | (empty_LWc & (rank_LWc <= need_L11))
            sizes = (n,) * L
        index = take_LWc.reshape(-1).nonzero().squeeze(1)
        # flexible row l * W * c + w * c + j is received row (w * L + l) * c + j
        expert, rest = index // (W * c), index % (W * c)
        source = (rest // c * L + expert) * c + rest % c
        return FilledRows(index, sizes, source)

    def gather(self, recv_WLcM: torch.Tensor) -> torch.Tensor:
        """The rows to multiply, grouped by local expert, from a received chunk: one copy either way
        (a gather of the chosen rows, or the reordering of all of them)."""
        if self.index is None:
            return _to_flexible(recv_WLcM)
        return recv_WLcM.reshape(-1, recv_WLcM.shape[-1]).index_select(0, self.source)

    def scatter(self, rows_NM: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """The experts' output rows back to the [W, L, c, M] layout they came in; the rows without a
        token (their senders never read them) are zeros or padding outputs."""
        W, L, c = shape
        if self.index is None:
            return _from_flexible(rows_NM, W, L, c)
        out = rows_NM.new_zeros(W * L * c, rows_NM.shape[1])
        return out.index_copy_(0, self.source, rows_NM).view(W, L, c, -1)


class Exchange:
    """The all-to-alls in flight between StartExchange and PipelinedExpertExchange (forward: the counts
    and the inbound chunks; backward: the outbound gradient chunks): a plain object, not a tensor."""

    def __init__(self):
        self.shape = self.counts = self.inbound = self.outbound = None

    def start(self, send_dWLcM, filled_WLd, groups, algorithm: str) -> Exchange:
        self.shape = send_dWLcM.shape
        self.counts = groups.all_to_all_start(filled_WLd, "flat")
        self.inbound = [groups.all_to_all_start(chunk, algorithm) for chunk in send_dWLcM]
        return self

    def take_inbound(self):
        counts, inbound = self.counts, self.inbound
        self.counts = self.inbound = None  # the received chunks need not outlive the forward
        return counts, inbound

    def finish_outbound(self) -> torch.Tensor:
        (handles, buffer), self.outbound = self.outbound, None
        return _wait_all(handles, buffer)


def _wait_all(handles, buffer: torch.Tensor) -> torch.Tensor:
    """Wait for the chunk all-to-alls that receive into `buffer`'s chunks; returns `buffer`."""
    for handle in handles:
        handle.wait()
    return buffer


class StartExchange(torch.autograd.Function):
    """Starts the exchange so that other work (the shared experts) runs while the chunks are in
    flight. Its backward waits for the gradient chunks PipelinedExpertExchange.backward started: the
    engine runs ready nodes latest-created first, so the work created between the two runs before."""

    @staticmethod
    @amp_forward(cast_inputs=True)  # what travels is in the autocast dtype
    def forward(ctx, send_dWLcM, filled_WLd, exchange: Exchange, groups, algorithm: str):
        ctx.exchange = exchange.start(send_dWLcM, filled_WLd, groups, algorithm)
        return send_dWLcM.new_empty(0)  # a token: PipelinedExpertExchange's input, for the graph's order

    @staticmethod
    @amp_backward
    def backward(ctx, _grad_token):
        return ctx.exchange.finish_outbound(), None, None, None, None


class PipelinedExpertExchange(torch.autograd.Function):
    """`send_or_token`: the send buffer, or, with `exchange` (started by StartExchange), its token."""

    @staticmethod
    @amp_forward(cast_inputs=True)  # tokens and weights in the autocast dtype: what travels is low precision
    def forward(
        ctx,
        send_or_token,
        exchange,
        filled_WLd,
        w1,
        b1,
        w2,
        b2,
        groups,
        algorithm: str,
        activation: str,
    ):
        # StartExchange's node (None: no gradient flows to it), whose backward waits for the gradient
        # chunks this backward starts; the token is already in the autocast dtype, so not recast here
        ctx.started = exchange is not None
        ctx.start_node = send_or_token.grad_fn if ctx.started else None
        if not ctx.started:
            exchange = Exchange().start(send_or_token, filled_WLd, groups, algorithm)
        d, W, L, c, M = exchange.shape
        weights = ExpertWeights(w1, b1, w2, b2, activation)
        counts, inbound = exchange.take_inbound()
        received_WLd = counts.wait()
        filled = [FilledRows.from_counts(received_WLd[:, :, i], c, w1.shape[2]) for i in range(d)]
        outbound, saved = [], []
        ret = send_or_token.new_empty(exchange.shape)  # the token has the send buffer's dtype
        for i, (handle, rows) in enumerate(zip(inbound, filled, strict=True)):
            x_NM = rows.gather(handle.wait())
            y_NM, hpre = ffn_forward(x_NM, weights, rows.sizes)
            saved += [x_NM, hpre]  # the activation is recomputed from hpre in backward
            y_WLcM = rows.scatter(y_NM, (W, L, c))
            outbound.append(groups.all_to_all_start(y_WLcM, algorithm, out=ret[i]))
        _wait_all(outbound, ret)
        ctx.save_for_backward(w1, b1, w2, b2, *saved)
        ctx.groups, ctx.algorithm, ctx.activation = groups, algorithm, activation
        ctx.shape, ctx.filled = (W, L, c), filled
        ctx.exchange = exchange
        return ret

    @staticmethod
    @amp_backward
    def backward(ctx, grad_ret_dWLcM):
        w1, b1, w2, b2, *saved = ctx.saved_tensors
        weights = ExpertWeights(w1, b1, w2, b2, ctx.activation)
        W, L, c = ctx.shape
        needs = ctx.needs_input_grad
        need_weights = any(needs[3:7])
        grad_ret_dWLcM = grad_ret_dWLcM.contiguous()
        inbound = [ctx.groups.all_to_all_start(g, ctx.algorithm) for g in grad_ret_dWLcM]
        grad_send, outbound, totals = torch.empty_like(grad_ret_dWLcM), [], None
        for i, (handle, rows) in enumerate(zip(inbound, ctx.filled, strict=True)):
            x_NM, hpre = saved[2 * i : 2 * i + 2]
            grads = ffn_backward(
                rows.gather(handle.wait()),
                x_NM,
                hpre,
                weights,
                rows.sizes,
                need_input_grad=True,
                need_weight_grads=need_weights,
            )
            grad_x_WLcM = rows.scatter(grads.x_RM, (W, L, c))
            # every rank sends its share whether or not it needs the result: the exchange is collective
            outbound.append(ctx.groups.all_to_all_start(grad_x_WLcM, ctx.algorithm, out=grad_send[i]))
            if need_weights:
                parts = (grads.w1_GMX, grads.b1_GX, grads.w2_GHM, grads.b2_GM)
                totals = (
                    parts
                    if totals is None
                    else tuple(None if t is None else t.add_(p) for t, p in zip(totals, parts, strict=True))
                )
        gw1, gb1, gw2, gb2 = totals if totals is not None else (None,) * 4
        start = ctx.start_node
        if start is not None and torch._C._will_engine_execute_node(start):
            # StartExchange.backward waits, after the nodes created between the two (shared experts)
            ctx.exchange.outbound = (outbound, grad_send)
            grad_first = grad_ret_dWLcM.new_zeros(0)
        else:  # no StartExchange, or this backward does not reach it: wait here
            _wait_all(outbound, grad_send)
            grad_first = grad_send if needs[0] and not ctx.started else None
        return grad_first, None, None, gw1, gb1, gw2, gb2, None, None, None


def pipelined_expert_exchange(
    send_dWLcM: torch.Tensor,
    filled_WLd: torch.Tensor,
    weights: ExpertWeights,
    groups,
    *,
    algorithm: str,
    beside: Callable[[], Any] | None = None,
) -> tuple[torch.Tensor, Any]:
    """Differentiable: chunk-major send buffer [d, W, L, c, M] -> (the experts' outputs back at the
    senders, same shape; beside()). filled_WLd (int [W, L, d]): the rows of block (w, l) of chunk i
    that hold a token, a prefix of its c rows: the rows the receiving experts multiply; the other rows
    come back as zeros (or padding outputs, see FilledRows), which no sender reads.
    `beside` (other work, e.g. the shared experts) runs while the chunks are in flight, and its
    backward while the gradient chunks travel back; None: nothing runs beside, no extra node."""
    first, exchange, side = send_dWLcM.contiguous(), None, None
    if beside is not None:
        exchange = Exchange()  # started by StartExchange.forward
        first = StartExchange.apply(first, filled_WLd, exchange, groups, algorithm)
        side = beside()
    ret = PipelinedExpertExchange.apply(
        first,
        exchange,
        filled_WLd,
        weights.w1_GMX,
        weights.b1_GX,
        weights.w2_GHM,
        weights.b2_GM,
        groups,
        algorithm,
        weights.activation,
    )
    return ret, side
