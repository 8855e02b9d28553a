"""Choosing a plan: the cost model, the ranker refit from trials, trial statistics and timing, the
run-time tuner and its plan tables."""
