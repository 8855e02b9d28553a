"""All-to-all overlapped with expert compute in d capacity chunks, forward and backward (DESIGN 4).

Legend: W ranks, L local experts (E_local), Cp capacity rows per (rank, local expert) in the send
buffer, c = Cp / d rows per chunk, M model dim, R = L * W * c rows of a received chunk, N of them
hold a token.

    send [W, L, Cp, M] --a2a--> recv [W, L, c, M] per chunk --> flexible layout [L, W * c, M]
      --> filled rows only --> expert FFN --> [W, L, c, M] --a2a back--> ret [W, L, Cp, M]

All d chunk all-to-alls are started asynchronously up front; while the experts compute chunk i the
later chunks are in flight, and chunk i's return all-to-all overlaps the compute of chunk i + 1.
Backward runs the same schedule on the gradients (the adjoint of an all-to-all is an all-to-all),
accumulating the weight gradients chunk by chunk. Results do not depend on d.

Capacity slots that no token filled are never multiplied: the filled rows of every (sender, local
expert, chunk) are a prefix (routing fills slots in order), so the senders' row counts, exchanged by
one small all-to-all started together with the data chunks, say exactly which received rows to pack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexmoe.amp import amp_backward, amp_forward
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


@dataclass(frozen=True)
class FilledRows:
    """The rows of one received chunk, in the flexible layout [L * W * c], that hold a token."""

    index: torch.Tensor | None  # None: every row is filled
    sizes: tuple[int, ...]  # filled rows per local expert, the grouped FFN's group sizes

    @staticmethod
    def from_counts(filled_WL: torch.Tensor, c: int) -> FilledRows:
        """filled_WL: rows of the chunk that sender w filled for local expert l (a prefix of its c)."""
        W, L = filled_WL.shape
        sizes = tuple(int(n) for n in filled_WL.sum(0).tolist())
        if sum(sizes) == L * W * c:
            return FilledRows(None, sizes)
        mask_LWc = torch.arange(c, device=filled_WL.device) < filled_WL.t().unsqueeze(-1)
        return FilledRows(mask_LWc.reshape(-1).nonzero().squeeze(1), sizes)

    def pack(self, rows_RM: torch.Tensor) -> torch.Tensor:
        return rows_RM if self.index is None else rows_RM.index_select(0, self.index)

    def unpack(self, packed_NM: torch.Tensor, num_rows: int) -> torch.Tensor:
        """Back to all rows; rows without a token are zeros (their senders never read them)."""
        if self.index is None:
            return packed_NM
        rows = packed_NM.new_zeros(num_rows, packed_NM.shape[1])
        return rows.index_copy_(0, self.index, packed_NM)


class PipelinedExpertExchange(torch.autograd.Function):
    @staticmethod
    @amp_forward(cast_inputs=True)  # tokens and weights in the autocast dtype: what travels is low precision
    def forward(ctx, send_WLCM, filled_WLd, w1, b1, w2, b2, groups, d: int, algorithm: str, activation: str):
        W, L, Cp, M = send_WLCM.shape
        assert Cp % d == 0, "capacity must be padded to a multiple of d"
        c = Cp // d
        weights = ExpertWeights(w1, b1, w2, b2, activation)
        counts = groups.all_to_all_start(filled_WLd, "flat")
        inbound = [groups.all_to_all_start(chunk, algorithm) for chunk in _chunks(send_WLCM, d)]
        received_WLd = counts.wait()
        filled = [FilledRows.from_counts(received_WLd[:, :, i], c) for i in range(d)]
        outbound, saved = [], []
        for handle, rows in zip(inbound, filled, strict=True):
            x_NM = rows.pack(_to_flexible(handle.wait()))
            y_NM, hpre = ffn_forward(x_NM, weights, rows.sizes)
            saved += [x_NM, hpre]  # the activation is recomputed from hpre in backward
            y_RM = rows.unpack(y_NM, L * W * c)
            outbound.append(groups.all_to_all_start(_from_flexible(y_RM, W, L, c), algorithm))
        ret = torch.cat([handle.wait() for handle in outbound], dim=2)
        ctx.save_for_backward(w1, b1, w2, b2, *saved)
        ctx.groups, ctx.d, ctx.algorithm, ctx.activation = groups, d, algorithm, activation
        ctx.shape, ctx.filled = (W, L, c), filled
        return ret

    @staticmethod
    @amp_backward
    def backward(ctx, grad_ret_WLCM):
        w1, b1, w2, b2, *saved = ctx.saved_tensors
        weights = ExpertWeights(w1, b1, w2, b2, ctx.activation)
        W, L, c = ctx.shape
        needs = ctx.needs_input_grad
        need_weights = any(needs[2:6])
        inbound = [ctx.groups.all_to_all_start(g, ctx.algorithm) for g in _chunks(grad_ret_WLCM, ctx.d)]
        outbound = []
        totals = None
        for i, (handle, rows) in enumerate(zip(inbound, ctx.filled, strict=True)):
            x_NM, hpre = saved[2 * i : 2 * i + 2]
            grads = ffn_backward(
                rows.pack(_to_flexible(handle.wait())),
                x_NM,
                hpre,
                weights,
                rows.sizes,
                need_input_grad=True,
                need_weight_grads=need_weights,
            )
            grad_x_RM = rows.unpack(grads.x_RM, L * W * c)
            outbound.append(ctx.groups.all_to_all_start(_from_flexible(grad_x_RM, W, L, c), ctx.algorithm))
            if need_weights:
                parts = (grads.w1_GMX, grads.b1_GX, grads.w2_GHM, grads.b2_GM)
                totals = (
                    parts
                    if totals is None
                    else tuple(None if t is None else t.add_(p) for t, p in zip(totals, parts, strict=True))
                )
        grad_send = torch.cat([handle.wait() for handle in outbound], dim=2)
        gw1, gb1, gw2, gb2 = totals if totals is not None else (None,) * 4
        return grad_send if needs[0] else None, None, gw1, gb1, gw2, gb2, None, None, None, None


def pipelined_expert_exchange(
    send_WLCM: torch.Tensor,
    filled_WLC: torch.Tensor,
    weights: ExpertWeights,
    groups,
    *,
    d: int,
    algorithm: str,
):
    """Differentiable: send buffer [W, L, Cp, M] -> the experts' outputs back at the senders, same shape.
    filled_WLC (bool [W, L, Cp]) marks the rows that hold a token: a prefix of every (w, l) block, the
    rows the receiving experts multiply; the other rows come back as zeros."""
    W, L, Cp = filled_WLC.shape
    filled_WLd = filled_WLC.view(W, L, d, Cp // d).sum(-1)  # per chunk
    return PipelinedExpertExchange.apply(
        send_WLCM.contiguous(),
        filled_WLd,
        weights.w1_GMX,
        weights.b1_GX,
        weights.w2_GHM,
        weights.b2_GM,
        groups,
        d,
        algorithm,
        weights.activation,
    )
