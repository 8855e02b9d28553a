"""All-to-all overlapped with expert compute in d chunks, forward and backward (DESIGN 4).

Legend: d chunks, S rows of the senders' buffer, M model dim, N rows of a chunk the experts multiply.

    send [S, M] --a2a of chunk i--> received rows --> grouped by local expert --> expert FFN
      --> back in the order they came --a2a back--> ret[chunk i] of ret [S, M]

Where each row lives, in the buffer and in its chunk, is the layout's business (parallel.chunks:
only the rows that hold a token, for the flat all-to-all; fixed-size blocks for 2DH); this module is
the schedule. Each chunk is one contiguous part of the buffer that the all-to-all sends as it is and
receives into its place, so no chunk is copied out before sending nor concatenated after receiving.

All d chunk all-to-alls are started asynchronously up front; while the experts compute chunk i the
later chunks are in flight, and chunk i's return all-to-all overlaps the compute of chunk i + 1.
Backward runs the same schedule on the gradients (the adjoint of an all-to-all is an all-to-all),
accumulating the weight gradients chunk by chunk. Results do not depend on d nor on the layout.

Other work can run beside the exchange (`beside`: the layer's shared experts): StartExchange starts the
chunks, the work runs, PipelinedExpertExchange waits; in backward the engine runs the work's backward
between PipelinedExpertExchange.backward starting the gradient chunks and StartExchange.backward
waiting for them (tests/parallel/test_shared_overlap.py records that order).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from flexmoe.ops.amp import amp_backward, amp_forward
from flexmoe.ops.expert_ffn import Activation, ExpertWeights, ffn_backward, ffn_forward


class Exchange:
    """The all-to-alls in flight between StartExchange and PipelinedExpertExchange (forward: the inbound
    chunks; backward: the outbound gradient chunks): a plain object, not a tensor."""

    def __init__(self):
        self.inbound = self.outbound = None

    def start(self, send_SM: torch.Tensor, layout, groups, hidden_width: int) -> Exchange:
        self.inbound = layout.start(send_SM, groups, hidden_width)
        return self

    def take_inbound(self):
        inbound, self.inbound = self.inbound, None  # the received chunks need not outlive the forward
        return inbound

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
    def forward(ctx, send_SM, layout, exchange: Exchange, groups, hidden_width: int):
        ctx.exchange = exchange.start(send_SM, layout, groups, hidden_width)
        return send_SM.new_empty(0)  # a token: PipelinedExpertExchange's input, for the graph's order

    @staticmethod
    @amp_backward
    def backward(ctx, _grad_token):
        return ctx.exchange.finish_outbound(), None, None, None, None


class PipelinedExpertExchange(torch.autograd.Function):
    """`send_or_token`: the send buffer, or, with `exchange` (started by StartExchange), its token."""

    @staticmethod
    @amp_forward(cast_inputs=True)  # tokens and weights in the autocast dtype: what travels is low precision
    def forward(ctx, send_or_token, exchange, layout, w1, b1, w2, b2, groups, activation: Activation):
        # StartExchange's node (None: no gradient flows to it), whose backward waits for the gradient
        # chunks this backward starts; the token is already in the autocast dtype, so not recast here
        ctx.started = exchange is not None
        ctx.start_node = send_or_token.grad_fn if ctx.started else None
        if not ctx.started:
            exchange = Exchange().start(send_or_token, layout, groups, w1.shape[2])
        weights = ExpertWeights(w1, b1, w2, b2, activation)
        inbound = exchange.take_inbound()
        routes = inbound.routes()
        outbound, saved = [], []
        ret_SM = send_or_token.new_empty(layout.num_rows, w1.shape[1])  # the token has the buffer's dtype
        for handle, route, ret_chunk in zip(inbound.chunks, routes, layout.chunks(ret_SM), strict=True):
            x_NM = route.gather(handle.wait())
            y_NM, hpre = ffn_forward(x_NM, weights, route.sizes)
            saved += [x_NM, hpre]  # the activation is recomputed from hpre in backward
            outbound.append(route.to_senders(groups, route.scatter(y_NM), out=ret_chunk))
        _wait_all(outbound, ret_SM)
        ctx.save_for_backward(w1, b1, w2, b2, *saved)
        ctx.groups, ctx.activation = groups, activation
        ctx.layout, ctx.routes = layout, routes
        ctx.exchange = exchange
        return ret_SM

    @staticmethod
    @amp_backward
    def backward(ctx, grad_ret_SM):
        w1, b1, w2, b2, *saved = ctx.saved_tensors
        weights = ExpertWeights(w1, b1, w2, b2, ctx.activation)
        groups, layout, routes = ctx.groups, ctx.layout, ctx.routes
        needs = ctx.needs_input_grad
        need_weights = any(needs[3:7])
        grad_ret_SM = grad_ret_SM.contiguous()
        chunks = layout.chunks(grad_ret_SM)
        inbound = [route.to_experts(groups, g) for route, g in zip(routes, chunks, strict=True)]
        grad_send, outbound, totals = torch.empty_like(grad_ret_SM), [], None
        chunk_work = zip(inbound, routes, layout.chunks(grad_send), strict=True)
        for i, (handle, route, grad_send_chunk) in enumerate(chunk_work):
            x_NM, hpre = saved[2 * i : 2 * i + 2]
            grads = ffn_backward(
                route.gather(handle.wait()),
                x_NM,
                hpre,
                weights,
                route.sizes,
                need_input_grad=True,
                need_weight_grads=need_weights,
            )
            # every rank sends its share whether or not it needs the result: the exchange is collective
            outbound.append(route.to_senders(groups, route.scatter(grads.x_RM), out=grad_send_chunk))
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
            grad_first = grad_ret_SM.new_zeros(0)
        else:  # no StartExchange, or this backward does not reach it: wait here
            _wait_all(outbound, grad_send)
            grad_first = grad_send if needs[0] and not ctx.started else None
        return grad_first, None, None, gw1, gb1, gw2, gb2, None, None


def pipelined_expert_exchange(
    send_SM: torch.Tensor,
    layout,
    weights: ExpertWeights,
    groups,
    *,
    beside: Callable[[], Any] | None = None,
) -> tuple[torch.Tensor, Any]:
    """Differentiable: the senders' buffer [S, M] in `layout` (parallel.chunks: PackedChunks or
    PaddedChunks, which also say how it travels) -> (the experts' outputs back at the senders, in the
    same rows; beside()). Rows that hold no token (padded layouts only) come back as zeros or padding
    outputs, which no sender reads. `beside` (other work, e.g. the shared experts) runs while the chunks
    are in flight, and its backward while the gradient chunks travel back; None: nothing runs beside,
    no extra node."""
    first, exchange, side = send_SM.contiguous(), None, None
    if beside is not None:
        exchange = Exchange()  # started by StartExchange.forward
        first = StartExchange.apply(first, layout, exchange, groups, weights.w1_GMX.shape[2])
        side = beside()
    ret = PipelinedExpertExchange.apply(
        first,
        exchange,
        layout,
        weights.w1_GMX,
        weights.b1_GX,
        weights.w2_GHM,
        weights.b2_GM,
        groups,
        weights.activation,
    )
    return ret, side
