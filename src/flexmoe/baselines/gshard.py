"""The Fairseq / GShard formulation of the same layer: one-hot masks and einsums.

It is what flexmoe replaces and is measured against, and a test oracle: the routing here is
computed independently of `flexmoe.core.routing` (masks and cumulative sums instead of a sort), on the
same parameter layout, so both layers can run on identical weights.

Legend: T tokens, M model dim, E experts, C capacity, k choices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flexmoe.core.config import MoEConfig
from flexmoe.core.experts import Experts
from flexmoe.core.gates import build_gate
from flexmoe.core.layout import ExpertLayout
from flexmoe.core.routing import balancing_loss, capacity_for
from flexmoe.ops.expert_ffn import activation_forward


class GShardMoELayer(nn.Module):
    """Single-process einsum MoE layer with MoELayer's routing semantics and parameter names."""

    def __init__(
        self,
        *dims: int,
        config: MoEConfig | None = None,
        seed: int = 0,
        dtype=None,
        device=None,
        group=None,
        **settings,
    ):
        """Built as MoELayer is: `(model_dim, hidden_dim, num_experts, **settings)` or `config=`."""
        super().__init__()
        if group is not None:
            raise ValueError("group: the einsum baseline runs on one process only (group=None)")
        self.config = config if config is not None else MoEConfig.from_arguments(dims, settings)
        model_dim, hidden_dim, num_experts = (
            self.config.model_dim,
            self.config.hidden_dim,
            self.config.num_experts,
        )
        layout = ExpertLayout(
            num_experts=num_experts,
            model_dim=model_dim,
            hidden_dim=hidden_dim,
            activation=self.config.activation,
        )
        self.gate = build_gate(
            self.config.gate,
            model_dim,
            num_experts,
            generator=torch.Generator().manual_seed(seed),
            device=device,
        )
        self.experts = Experts(layout, seed=seed, bias=self.config.bias, dtype=dtype, device=device)
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        rc = c.routing(training=self.training)
        x_TM = x.reshape(-1, c.model_dim)
        T, E, k = x_TM.shape[0], c.num_experts, c.top_k
        clean_TE = self.gate(x_TM)
        noise_std = rc.gate_noise / E if self.training else 0.0
        noisy_TE = clean_TE + torch.randn_like(clean_TE) * noise_std if noise_std > 0 else clean_TE
        scores_TE = F.softmax(noisy_TE, dim=-1)
        top_TK, experts_TK = scores_TE.topk(k, dim=-1)
        weights_TK = top_TK / top_TK.sum(-1, keepdim=True) if (c.normalize_gate and k > 1) else top_TK

        # priority: reorder tokens (batch-prioritized routing) so that cumsum order is priority order
        order_T = (
            torch.argsort(-top_TK[:, 0].detach(), stable=True)
            if c.batch_prioritized_routing
            else torch.arange(T)
        )
        masks_KTE = [F.one_hot(experts_TK[order_T, j], E) for j in range(k)]
        demand_E = sum(m.sum(0) for m in masks_KTE)
        max_demand = int(demand_E.max()) if T else 0
        C = capacity_for(rc.capacity_factor, top_k=k, num_tokens=T, num_experts=E, max_demand=max_demand)

        combine_TEC = scores_TE.new_zeros(T, E, C)
        filled_E = torch.zeros(E, dtype=torch.long)
        for j, mask_TE in enumerate(masks_KTE):
            location_TE = torch.cumsum(mask_TE, 0) - 1 + filled_E
            filled_E = filled_E + mask_TE.sum(0)
            keep_TE = mask_TE * (location_TE < C)
            location_T = (location_TE * keep_TE).sum(1)
            slot_TEC = keep_TE.unsqueeze(2) * F.one_hot(location_T, C).unsqueeze(1)
            combine_TEC = combine_TEC + weights_TK[order_T, j].view(T, 1, 1) * slot_TEC
        inverse_T = torch.empty_like(order_T)
        inverse_T[order_T] = torch.arange(T)
        combine_TEC = combine_TEC[inverse_T]
        dispatch_TEC = (combine_TEC != 0).to(x_TM.dtype)

        w = self.experts.local_weights()
        x_TM = x_TM.to(w.w1_GMX.dtype)
        dispatch_src = dispatch_TEC if c.is_postscore else combine_TEC.to(x_TM.dtype)
        x_ECM = torch.einsum("tec,tm->ecm", dispatch_src, x_TM)
        hpre = torch.einsum("ecm,emh->ech", x_ECM, w.w1_GMX)
        if w.b1_GX is not None:
            hpre = hpre + w.b1_GX.unsqueeze(1)
        out_ECM = torch.einsum("ech,ehm->ecm", activation_forward(w.activation, hpre), w.w2_GHM)
        if w.b2_GM is not None:
            out_ECM = out_ECM + w.b2_GM.unsqueeze(1)
        combine_src = combine_TEC.to(x_TM.dtype) if c.is_postscore else dispatch_TEC
        y_TM = torch.einsum("tec,ecm->tm", combine_src, out_ECM)
        self.aux_loss = balancing_loss(rc, clean_TE, noisy_TE, scores_TE, experts_TK, noise_std)
        return y_TM.to(x.dtype).view(x.shape)
