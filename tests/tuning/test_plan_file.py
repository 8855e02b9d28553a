"""Plan files on one process: validation, matching entries to layers, the note of an empty table,
the `flexmoe tune` guard."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from flexmoe import MoELayer
from flexmoe.tuning.plan_table import (
    ONE_PROCESS_NOTE,
    apply_plan_table,
    export_plan_table,
    read_plan_table,
    write_plan_table,
)


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = MoELayer(8, 16, 2, seed=0)
        self.b = MoELayer(8, 32, 2, seed=1)


def test_export_write_read_and_apply(tmp_path):
    model = Two()
    path = write_plan_table(tmp_path / "plans.json", model)
    table = read_plan_table(path)
    assert set(table["layers"]) == {"a", "b"} and table == json.loads(path.read_text())
    assert table["layers"]["b"]["layer"]["hidden_dim"] == 32
    notes = apply_plan_table(Two(), path)
    assert set(notes) == {"a", "b"} and all(n.startswith("loaded") for n in notes.values())
    # a lone layer finds its entry by its settings
    layer = MoELayer(8, 32, 2, seed=5, plan_table=str(path))
    assert layer.tuner.load_note.startswith("loaded")
    assert export_plan_table(layer)["layers"][""]["layer"]["hidden_dim"] == 32


def test_a_one_process_table_is_empty_and_says_why(tmp_path):
    model = Two()
    for layer in (model.a, model.b):
        layer(torch.randn(300, 8)).sum().backward()  # a training step: still nothing to tune
    table = export_plan_table(model)
    assert [e["tuner"]["buckets"] for e in table["layers"].values()] == [[], []]
    assert table["note"] == ONE_PROCESS_NOTE and "nothing was tuned" in table["note"]
    path = write_plan_table(tmp_path / "plans.json", model)
    assert read_plan_table(path)["note"] == ONE_PROCESS_NOTE
    notes = apply_plan_table(Two(), path)
    expected = "loaded 0 bucket(s): one process: every plan is the same local computation, nothing to tune"
    assert notes == {"a": expected, "b": expected}
    assert MoELayer(8, 16, 2, plan_table=str(path)).tuner.load_note == expected


def test_a_table_from_several_processes_is_not_taken_on_one():
    table = export_plan_table(Two())
    del table["note"]
    for entry in table["layers"].values():  # as if recorded on 2 ranks
        entry["tuner"].update(world_size=2, ranks=[0, 1])
    note = apply_plan_table(Two(), table)["a"]
    assert note.startswith("not loaded (one process: every plan is the same local computation")
    assert "world_size 2 (here 1)" in note


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_plan_table(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        read_plan_table(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="format"):
        read_plan_table({"format": "something else"})
    with pytest.raises(ValueError, match="path or a dict"):
        read_plan_table(42)
    table = export_plan_table(Two())
    with pytest.raises(ValueError, match="no entry"):
        MoELayer(8, 64, 2, plan_table=table)  # no layer with hidden_dim 64 in the file
    with pytest.raises(ValueError, match="tuner=False"):
        MoELayer(8, 16, 2, tuner=False, plan_table=table)


def test_tune_needs_torchrun():
    from flexmoe.app.tune import main

    with pytest.raises(ValueError, match="run under torchrun"):  # `flexmoe tune`: one line, exit code 2
        main(["--max-steps", "1"])
