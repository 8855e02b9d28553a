"""The online refit of the cost model: exact NNLS, recovered scales, a ranking that improves, Spearman."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flexmoe.core.plans import Plan
from flexmoe.tuning.cost_model import PRESETS, TERMS, CostModel, LayerShape, candidate_plans
from flexmoe.tuning.ranker import PlanRanker, fit_scales, nonnegative_least_squares, spearman

SHAPE = dict(model_dim=128, hidden_dim=256, num_experts=4, world_size=2, top_k=2, bytes_per_element=4)


def test_nnls_matches_the_constrained_optimum():
    A = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = np.array([2.0, -1.0, 1.0])  # unconstrained x has a negative second entry
    x = nonnegative_least_squares(A, b)
    assert x[1] == 0 and x[0] == pytest.approx(1.5)


def test_fit_recovers_the_scales_that_made_the_times():
    model = CostModel(PRESETS["cpu-gloo"])
    plans = candidate_plans(LayerShape(capacity=1, tokens=1, **SHAPE), two_dh=False)
    true = np.array([2.0, 0.5, 1.5, 3.0, 0.0])
    ranker = PlanRanker(model, plans, shape=SHAPE)
    rows, times = [], []
    for capacity in (256, 1024, 2048):
        for p in plans:
            row = ranker.terms(capacity, p)
            rows.append(row)
            times.append(float(np.dot(true, row)))
    theta = fit_scales(rows, times, prior_weight=1e-9)
    assert theta[:4] == pytest.approx(true[:4], rel=1e-3)  # overlap is 0 on this preset: any scale fits


def test_refit_reorders_the_candidates_by_what_was_measured():
    shape = dict(model_dim=1024, hidden_dim=4096, num_experts=8, world_size=8, top_k=2)
    model = CostModel(PRESETS["a100"])
    plans = candidate_plans(LayerShape(capacity=1, tokens=1, **shape), two_dh=False)
    ranker = PlanRanker(model, plans, shape=shape)
    # this "machine": a 20x faster network and 5x cheaper calls than the preset says
    true = np.array([1.0, 1.0, 0.05, 0.2, 1.0])
    measured = {p: float(np.dot(true, ranker.terms(1024, p))) for p in plans}
    fastest = min(measured, key=measured.get)
    assert ranker(1024)[0][0] != fastest

    def rho():
        return spearman([ranker.predict(1024, p) for p in plans], [measured[p] for p in plans])

    before = rho()
    for p, _ in ranker(1024)[:3]:  # what one exploration of the three best-predicted candidates saw
        ranker.observe(1024, p, measured[p])
    assert ranker(1024)[0][0] == fastest
    assert rho() > max(before, 0.8)
    assert set(ranker.scales()) == set(TERMS)


def test_observations_are_agreed_data_only_and_idempotent():
    model = CostModel(PRESETS["cpu-gloo"])
    plans = [Plan(r=0), Plan()]
    ranker = PlanRanker(model, plans, shape=SHAPE)
    ranker.observe(512, Plan(r=0), 0.01)
    ranker.observe(512, Plan(r=0), 0.01)
    assert len(ranker.samples) == 1
    ranker.observe(512, Plan(r=5), 0.01)  # not a candidate: ignored
    ranker.observe(512, Plan(), math.inf)  # never measured: ignored
    assert len(ranker.samples) == 1


def test_spearman():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(spearman([1], [2]))
    with pytest.raises(ValueError, match="same length"):
        spearman([1, 2], [1])
