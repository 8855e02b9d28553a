"""The tuner's ranking of candidate plans: the cost model, refit online from the agreed trial times.

The cost model's prediction is a sum of named terms (compute, elementwise, bandwidth, latency,
overlap; see cost_model). A machine is rarely what its preset says: the GEMMs may run at half the
rate, the network may be faster than its latency suggests. So the prediction becomes
sum_k theta_k * term_k with theta >= 0, fit to the measured step times by non-negative least
squares on RELATIVE errors (a 10 ms plan counts as much as a 100 ms one), pulled towards theta = 1
(the model as calibrated) with a small weight, so a few samples do not swing it. Each exploration
adds its candidates' agreed medians; later buckets are ranked by the refit model.

The samples are agreed across ranks (the tuner feeds only agreed medians), so every rank fits the
same theta and ranks the candidates in the same order: the order decides which collectives run.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from flexmoe.core.plans import Plan
from flexmoe.tuning.cost_model import TERMS, CostModel, LayerShape


def nonnegative_least_squares(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||A x - b|| subject to x >= 0, exactly, by trying every support set: the optimum is the
    unconstrained solution on its support, and with the five terms that is 31 tiny solves."""
    n = A.shape[1]
    best, best_residual = np.zeros(n), float(np.sum(b**2))
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            cols = list(support)
            x_s, *_ = np.linalg.lstsq(A[:, cols], b, rcond=None)
            if np.any(x_s < 0):
                continue
            x = np.zeros(n)
            x[cols] = x_s
            residual = float(np.sum((A @ x - b) ** 2))
            if residual < best_residual - 1e-15:
                best, best_residual = x, residual
    return best


def fit_scales(rows: list[list[float]], seconds: list[float], *, prior_weight: float) -> np.ndarray:
    """theta >= 0 minimising sum_i ((row_i . theta - t_i) / t_i)^2 + prior_weight * |theta - 1|^2."""
    k = len(TERMS)
    A = np.array([[v / t for v in row] for row, t in zip(rows, seconds, strict=True)]).reshape(-1, k)
    b = np.ones(len(seconds))
    root = math.sqrt(prior_weight)
    A = np.vstack([A, root * np.eye(k)])
    b = np.concatenate([b, root * np.ones(k)])
    return nonnegative_least_squares(A, b)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (ties get their average rank); nan for fewer than 2 pairs."""
    if len(a) != len(b):
        raise ValueError(f"a and b must have the same length, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return math.nan

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for m in range(i, j + 1):
                out[order[m]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = np.array(ranks(a)), np.array(ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / denom) if denom else math.nan


class PlanRanker:
    """rank_plans for PlanTuner: capacity -> [(plan, predicted seconds)], best first; `observe` adds a
    measured (capacity, plan, seconds) and refits. A small top-level class, so a tuner pickles.

    `shape` holds the LayerShape fields other than capacity and tokens; the tokens per rank follow
    from the capacity: T = E * C / (k * cf) (cf > 0), or E * C / k (dropless or dynamic)."""

    def __init__(
        self,
        model: CostModel,
        plans: list[Plan],
        *,
        shape: dict,
        capacity_factor: float = 1.0,
        prior_weight: float = 0.05,
    ):
        self.model, self.plans, self.shape = model, list(plans), dict(shape)
        self.capacity_factor = capacity_factor
        self.prior_weight = prior_weight
        self.theta = np.ones(len(TERMS))
        self.samples: dict[
            tuple[int, Plan], float
        ] = {}  # a newer time of a (capacity, plan) replaces the older

    def set_bytes_per_element(self, nbytes: int) -> None:
        """The element size the collectives carry this step (the layer's compute dtype: autocast's
        under autocast, else the parameters')."""
        self.shape["bytes_per_element"] = nbytes

    def layer_shape(self, capacity: int) -> LayerShape:
        spread = self.capacity_factor if self.capacity_factor > 0 else 1.0
        per_rank = self.shape["num_experts"] * capacity / (self.shape["top_k"] * max(spread, 1.0))
        return LayerShape(capacity=max(1, capacity), tokens=max(1, round(per_rank)), **self.shape)

    def terms(self, capacity: int, plan: Plan) -> list[float]:
        t = self.model.terms(self.layer_shape(capacity), plan)
        return [t[k] for k in TERMS]

    def predict(self, capacity: int, plan: Plan) -> float:
        return max(0.0, float(np.dot(self.theta, self.terms(capacity, plan))))

    def __call__(self, capacity: int) -> list[tuple[Plan, float]]:
        scored = [(p, self.predict(capacity, p)) for p in self.plans]
        # stable sort: equal predictions keep the candidate order (the same on every rank)
        return sorted(scored, key=lambda pt: pt[1])

    def observe(self, capacity: int, plan: Plan, seconds: float) -> None:
        if plan not in self.plans or not (math.isfinite(seconds) and seconds > 0):
            return
        self.samples[(int(capacity), plan)] = float(seconds)
        keys = list(self.samples)
        self.theta = fit_scales(
            [self.terms(c, p) for c, p in keys],
            [self.samples[k] for k in keys],
            prior_weight=self.prior_weight,
        )

    def scales(self) -> dict[str, float]:
        return dict(zip(TERMS, self.theta.tolist(), strict=True))
