"""Counting what the pipelined exchange multiplies, for tests of its padding and memory."""

from __future__ import annotations

from flexmoe.parallel import pipeline


def record_multiplied_rows(monkeypatch) -> list[int]:
    """The rows of every grouped-FFN forward the pipelined exchange runs from now on, appended to the
    returned list (`monkeypatch`: pytest's fixture, which undoes the patch after the test)."""
    rows: list[int] = []
    real_forward = pipeline.ffn_forward

    def counting_forward(x_RM, weights, sizes):
        rows.append(x_RM.shape[0])
        return real_forward(x_RM, weights, sizes)

    monkeypatch.setattr(pipeline, "ffn_forward", counting_forward)
    return rows
