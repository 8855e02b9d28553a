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
