"""All-to-all overlapped with expert compute in d capacity chunks, forward and backward (DESIGN 4).

Legend: W ranks, L local experts (E_local), Cp capacity rows per (rank, local expert) in the send
buffer, c = Cp / d rows per chunk, M model dim.

    send [W, L, Cp, M] --a2a--> recv [W, L, c, M] per chunk --> flexible layout [L, W * c, M]
      --> expert FFN --> [W, L, c, M] --a2a back--> ret [W, L, Cp, M]

All d chunk all-to-alls are started asynchronously up front; while the experts compute chunk i the
later chunks are in flight, and chunk i's return all-to-all overlaps the compute of chunk i + 1.
Backward runs the same schedule on the gradients (the adjoint of an all-to-all is an all-to-all),
accumulating the weight gradients chunk by chunk. Results do not depend on d.
"""

from __future__ import annotations

import torch

from flexmoe.ops.expert_ffn import ExpertWeights, ffn_backward, ffn_forward


def _to_flexible(recv_WLcM: torch.Tensor) -> torch.Tensor:
    """[W, L, c, M] -> [L * W * c, M]: each local expert's rows from every rank contiguous, so the
    expert GEMMs keep one large shape at any W."""
    W, L, c, M = recv_WLcM.shape
    return recv_WLcM.permute(1, 0, 2, 3).reshape(L * W * c, M)


def _from_flexible(rows: torch.Tensor, W: int, L: int, c: int) -> torch.Tensor:
    return rows.view(L, W, c, -1).permute(1, 0, 2, 3).contiguous()


def _chunks(t: torch.Tensor, d: int) -> list[torch.Tensor]:
    return [part.contiguous() for part in t.chunk(d, dim=2)]


class PipelinedExpertExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, send_WLCM, w1, b1, w2, b2, groups, d: int, algorithm: str, activation: str):
        W, L, Cp, M = send_WLCM.shape
        assert Cp % d == 0, "capacity must be padded to a multiple of d"
        c = Cp // d
        weights = ExpertWeights(w1, b1, w2, b2, activation)
        sizes = (W * c,) * L
        inbound = [groups.all_to_all_start(chunk, algorithm) for chunk in _chunks(send_WLCM, d)]
        outbound, saved = [], []
        for handle in inbound:
            x_RM = _to_flexible(handle.wait())
            y_RM, hpre, act = ffn_forward(x_RM, weights, sizes)
            saved += [x_RM, hpre, act]
            outbound.append(groups.all_to_all_start(_from_flexible(y_RM, W, L, c), algorithm))
        ret = torch.cat([handle.wait() for handle in outbound], dim=2)
        ctx.save_for_backward(w1, b1, w2, b2, *saved)
        ctx.groups, ctx.d, ctx.algorithm, ctx.activation, ctx.shape = (
            groups,
            d,
            algorithm,
            activation,
            (W, L, c),
        )
        return ret

    @staticmethod
    def backward(ctx, grad_ret_WLCM):
        w1, b1, w2, b2, *saved = ctx.saved_tensors
        weights = ExpertWeights(w1, b1, w2, b2, ctx.activation)
        W, L, c = ctx.shape
        needs = ctx.needs_input_grad
        need_weights = any(needs[1:5])
        inbound = [ctx.groups.all_to_all_start(g, ctx.algorithm) for g in _chunks(grad_ret_WLCM, ctx.d)]
        outbound = []
        totals = None
        for i, handle in enumerate(inbound):
            x_RM, hpre, act = saved[3 * i : 3 * i + 3]
            grads = ffn_backward(
                _to_flexible(handle.wait()),
                x_RM,
                hpre,
                act,
                weights,
                (W * c,) * L,
                need_input_grad=True,
                need_weight_grads=need_weights,
            )
            outbound.append(ctx.groups.all_to_all_start(_from_flexible(grads.x_RM, W, L, c), ctx.algorithm))
            if need_weights:
                parts = (grads.w1_GMX, grads.b1_GX, grads.w2_GHM, grads.b2_GM)
                totals = (
                    parts
                    if totals is None
                    else tuple(None if t is None else t.add_(p) for t, p in zip(totals, parts, strict=True))
                )
        grad_send = torch.cat([handle.wait() for handle in outbound], dim=2)
        gw1, gb1, gw2, gb2 = totals if totals is not None else (None,) * 4
        return grad_send if needs[0] else None, gw1, gb1, gw2, gb2, None, None, None, None


def pipelined_expert_exchange(
    send_WLCM: torch.Tensor, weights: ExpertWeights, groups, *, d: int, algorithm: str
):
    """Differentiable: send buffer [W, L, Cp, M] -> the experts' outputs back at the senders, same shape."""
    return PipelinedExpertExchange.apply(
        send_WLCM.contiguous(),
        weights.w1_GMX,
        weights.b1_GX,
        weights.w2_GHM,
        weights.b2_GM,
        groups,
        d,
        algorithm,
        weights.activation,
    )
