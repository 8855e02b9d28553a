"""Plain per-token reference of DESIGN section 2, written independently of flexmoe's routing code.

Everything is a Python loop over tokens and choices, in float64, on full (unsharded) parameters.
"""

from __future__ import annotations

import math

import torch


def activation(kind: str, h: torch.Tensor) -> torch.Tensor:
    if kind == "gelu":
        return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    if kind == "relu":
        return torch.clamp(h, min=0)
    if kind == "silu":
        return h / (1 + torch.exp(-h))
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return gate / (1 + torch.exp(-gate)) * up
    raise AssertionError(kind)


def reference_capacity(cf: float, k: int, T: int, E: int, demand: list[int]) -> int:
    largest = max(demand) if demand else 0
    if cf > 0:
        return max(1, min(T, math.ceil(k * cf * T / E)))  # no expert receives more than T
    if cf == 0:
        return max(1, largest)
    return max(1, min(largest, math.ceil(k * -cf * T / E)))


def reference_moe(x_TM, logits_TE, params, *, k, cf, normalize=True, bpr=False, postscore=True, act="gelu"):
    """Returns (y_TM, kept list of (t, j, e), capacity). params: full fc1_weight [E, M, X] etc."""
    T, E = logits_TE.shape
    scores = torch.softmax(logits_TE, dim=-1)
    choices = []  # per token: list of (expert, weight)
    for t in range(T):
        ranked = sorted(range(E), key=lambda e: -scores[t, e].item())[:k]
        ws = [scores[t, e] for e in ranked]
        if normalize and k > 1:
            total = sum(ws)
            ws = [w / total for w in ws]
        choices.append(list(zip(ranked, ws, strict=True)))
    positions = list(range(T))
    if bpr:
        positions = sorted(range(T), key=lambda t: -scores[t, choices[t][0][0]].item())
    demand = [0] * E
    for t in range(T):
        for e, _ in choices[t]:
            demand[e] += 1
    C = reference_capacity(cf, k, T, E, demand)
    used = [0] * E
    kept = []
    for j in range(k):
        for t in positions:
            e = choices[t][j][0]
            if used[e] < C:
                kept.append((t, j, e))
            used[e] += 1

    def expert(e, v):
        h = v @ params["fc1_weight"][e] + params["fc1_bias"][e]
        return activation(act, h) @ params["fc2_weight"][e] + params["fc2_bias"][e]

    rows = [torch.zeros_like(x_TM[0]) for _ in range(T)]
    for t, j, e in kept:
        w = choices[t][j][1].to(x_TM.dtype)
        rows[t] = rows[t] + (w * expert(e, x_TM[t]) if postscore else expert(e, w * x_TM[t]))
    return torch.stack(rows) if T else x_TM.new_zeros(0, x_TM.shape[1]), kept, C


def linear_logits(x_TM, gate_weight_EM):
    return x_TM @ gate_weight_EM.t()


def cosine_logits(x_TM, proj_weight, proj_bias, sim_PE, temperature):
    p = x_TM @ proj_weight.t() + proj_bias
    p = p / p.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s = sim_PE / sim_PE.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return p @ s * torch.exp(torch.clamp(temperature, max=math.log(100)))


def reference_moe_from_choices(x_TM, experts_TK, weights_TK, params, *, cf=0.0, postscore=True, act="gelu"):
    """Routing given from outside: token t's j-th choice is expert experts_TK[t][j] with weight
    weights_TK[t, j]; capacity and priority (choice j, then token position) as in reference_moe."""
    T, k = experts_TK.shape
    E = params["fc1_weight"].shape[0]
    demand = [0] * E
    for t in range(T):
        for j in range(k):
            demand[int(experts_TK[t, j])] += 1
    C = reference_capacity(cf, k, T, E, demand)
    used = [0] * E
    rows = [torch.zeros_like(x_TM[0]) for _ in range(T)]
    for j in range(k):
        for t in range(T):
            e = int(experts_TK[t, j])
            if used[e] < C:
                h_in = x_TM[t] if postscore else weights_TK[t, j] * x_TM[t]
                h = h_in @ params["fc1_weight"][e]
                if params.get("fc1_bias") is not None:
                    h = h + params["fc1_bias"][e]
                out = activation(act, h) @ params["fc2_weight"][e]
                if params.get("fc2_bias") is not None:
                    out = out + params["fc2_bias"][e]
                rows[t] = rows[t] + (weights_TK[t, j] * out if postscore else out)
            used[e] += 1
    return torch.stack(rows) if T else x_TM.new_zeros(0, x_TM.shape[1]), C


def reference_choices(
    logits_TE, *, k, score="softmax", normalize=True, scale=1.0, bias=None, groups=1, top_groups=None
):
    """Modern routers token by token: softmax or sigmoid scores; a selection-only bias; group-limited
    top-k (a group's score is the sum of its two best biased scores; only the best top_groups groups
    are eligible); weights are the chosen unbiased scores, renormalised (k > 1) and scaled.
    Returns (experts [T, k] long, weights [T, k])."""
    T, E = logits_TE.shape
    experts, weights = [], []
    for t in range(T):
        if score == "softmax":
            z = [torch.exp(logits_TE[t, e]) for e in range(E)]
            s = [v / sum(z) for v in z]
        else:
            s = [1 / (1 + torch.exp(-logits_TE[t, e])) for e in range(E)]
        c = [float(s[e].detach()) + (0.0 if bias is None else float(bias[e])) for e in range(E)]
        eligible = list(range(E))
        if top_groups is not None and top_groups < groups:
            size = E // groups
            group_score = [sum(sorted(c[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(groups)]
            best = sorted(range(groups), key=lambda g: -group_score[g])[:top_groups]
            eligible = [e for e in range(E) if e // size in best]
        ranked = sorted(eligible, key=lambda e: -c[e])[:k]
        ws = [s[e] for e in ranked]
        if normalize and k > 1:
            total = sum(ws)
            ws = [w / total for w in ws]
        experts.append(ranked)
        weights.append(torch.stack([w * scale for w in ws]))
    return torch.tensor(experts, dtype=torch.long).view(T, k), torch.stack(weights)


def reference_shared_expert(x_TM, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate_weight, *, act):
    rows = []
    for t in range(x_TM.shape[0]):
        h = x_TM[t] @ fc1_weight + (0 if fc1_bias is None else fc1_bias)
        out = activation(act, h) @ fc2_weight + (0 if fc2_bias is None else fc2_bias)
        if gate_weight is not None:
            out = out / (1 + torch.exp(-(x_TM[t] @ gate_weight[0])))
        rows.append(out)
    return torch.stack(rows)
