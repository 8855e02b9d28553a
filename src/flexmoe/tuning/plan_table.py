"""Plan files: the tuners' decided buckets of a model (or of one layer) as JSON, so a later run, or a
run of another program on the same machines, starts from them instead of exploring.

    {"format": "flexmoe-plan-table", "version": 1,
     "layers": {"<module name>": {"layer": {model_dim, hidden_dim, num_experts, top_k, activation},
                                  "tuner": <PlanTuner.state_dict()>}},
     "note": "..."}  # only in a table of one-process layers, which is empty: nothing runs the tuner

A layer takes the entry with its module name, else the first entry whose layer settings match its
own. The tuner itself checks that the world size and ranks match the recorded ones (else it explores
afresh, see PlanTuner.load_state_dict).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from flexmoe.json_file import write_json

__all__ = [
    "apply_plan_table",
    "export_plan_table",
    "layer_signature",
    "read_plan_table",
    "tuned_layers",
    "write_plan_table",
]

FORMAT, VERSION = "flexmoe-plan-table", 1
SIGNATURE = ("model_dim", "hidden_dim", "num_experts", "top_k", "activation")


def layer_signature(layer) -> dict:
    return {k: getattr(layer.config, k) for k in SIGNATURE}


def tuned_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules with a run-time tuner (MoELayer with tuner enabled), by module name."""
    return {name: m for name, m in model.named_modules() if getattr(m, "tuner", None) is not None}


# why a plan file of a one-process model holds no bucket (the tuner never runs there)
ONE_PROCESS_NOTE = "one process: every plan is the same local computation, nothing was tuned"


def export_plan_table(model: nn.Module) -> dict:
    """The plan table of every tuned layer of `model` (a model, or one MoELayer whose name is "").
    A table of one-process layers is empty and says why in its "note"."""
    layers = {
        name: {"layer": layer_signature(m), "tuner": m.tuner.state_dict()}
        for name, m in tuned_layers(model).items()
    }
    table = {"format": FORMAT, "version": VERSION, "layers": layers}
    if layers and all(e["tuner"]["world_size"] == 1 for e in layers.values()):
        table["note"] = ONE_PROCESS_NOTE
    return table


def write_plan_table(path, model: nn.Module) -> Path:
    return write_json(path, export_plan_table(model))


def read_plan_table(source) -> dict:
    """A plan table from a path, or checked as it is when already a dict."""
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"plan_table file {path} does not exist")
        try:
            table = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"plan_table file {path} is not JSON: {exc}") from None
    elif isinstance(source, dict):
        table = source
    else:
        raise ValueError(f"plan_table must be a path or a dict, got {type(source).__name__}")
    if table.get("format") != FORMAT or table.get("version") != VERSION:
        raise ValueError(
            f"plan_table must be a flexmoe plan file (format {FORMAT!r}, version {VERSION}), got "
            f"format {table.get('format')!r}, version {table.get('version')!r}"
        )
    if not isinstance(table.get("layers"), dict):
        raise ValueError("plan_table has no 'layers' mapping")
    return table


def _entry_for(table: dict, name: str, layer) -> dict | None:
    entry = table["layers"].get(name)
    if entry is not None and entry.get("layer") == layer_signature(layer):
        return entry
    signature = layer_signature(layer)
    return next((e for e in table["layers"].values() if e.get("layer") == signature), None)


def apply_plan_table(model: nn.Module, source, *, strict: bool = False) -> dict[str, str]:
    """Load the matching entry into every tuned layer of `model`; returns {layer name: what happened}.
    strict: a layer without a matching entry is a ValueError (else it explores as usual). `source` may
    also be one tuner's state_dict(), which every tuned layer then takes."""
    if isinstance(source, dict) and source.get("format") == "flexmoe-tuner":
        return {name: _load(m, source) for name, m in tuned_layers(model).items()}
    table = read_plan_table(source)
    notes = {}
    for name, layer in tuned_layers(model).items():
        entry = _entry_for(table, name, layer)
        if entry is None:
            if strict:
                raise ValueError(
                    f"plan_table has no entry for a layer with {layer_signature(layer)}; it holds "
                    f"{[e.get('layer') for e in table['layers'].values()]}"
                )
            notes[name] = "no entry: exploring"
            continue
        notes[name] = _load(layer, entry["tuner"])
    return notes


def _load(layer, state: dict) -> str:
    layer.tuner.load_state_dict(state)
    return layer.tuner.load_note
