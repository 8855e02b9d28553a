"""Plan files on one process: validation, matching entries to layers, the `flexmoe tune` guard."""

from __future__ import annotations

import json

import pytest
from torch import nn

from flexmoe import MoELayer
from flexmoe.tuning.plan_table import apply_plan_table, export_plan_table, read_plan_table, write_plan_table


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

    with pytest.raises(SystemExit, match="torchrun"):
        main(["--max-steps", "1"])
