"""load_checkpoint at any world size: read and check everything, re-slice the expert shards and their
optimizer state to each rank's layout, and change the model only when every rank has succeeded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from flexmoe.checkpoint import dtensors, files, integrity
from flexmoe.checkpoint.collective import Comm, fail_together
from flexmoe.checkpoint.model_state import (
    expert_modules,
    expert_params,
    expert_state_keys,
    full_shapes,
    key_prefix,
    layout_from,
    load_tuner_states,
    optimizer_group_names,
    param_names,
    unwrap,
)
from flexmoe.checkpoint.reslice import IndexMaps, rebuild_shard, saved_sources
from flexmoe.core.experts import EXPERT_PARAM_NAMES, Experts
from flexmoe.core.layout import ExpertLayout


class _RankFiles:
    """The saved expert files, each read (memory-mapped) the first time a shard in it is needed."""

    def __init__(self, root: Path, meta: dict):
        self.root, self.meta, self._files = root, meta, {}

    def module(self, module_name: str, layout_rank: int) -> dict:
        file_rank = self.meta["experts"][module_name]["files"][layout_rank]
        if file_rank not in self._files:
            _verify(self.root, self.meta, files.expert_file(file_rank))
            self._files[file_rank] = files.read(self.root / files.expert_file(file_rank), mmap=True)
        entry = self._files[file_rank].get("modules", {}).get(module_name)
        if entry is None or entry.get("layout_rank") != layout_rank:
            raise ValueError(
                f"corrupt flexmoe checkpoint {self.root}: {files.expert_file(file_rank)} does not hold "
                f"layout rank {layout_rank} of Experts module {module_name!r}"
            )
        return entry


def _verify(root: Path, meta: dict, name: str) -> None:
    """Check a data file against the checksum meta.pt holds for it (version 1 checkpoints hold none)."""
    if meta.get("version", 1) >= 2:
        integrity.verify(root, name, meta.get("checksums", {}).get(name))


def _describe(layout: ExpertLayout) -> str:
    return f"num_experts={layout.num_experts}, model_dim={layout.model_dim}, hidden_dim={layout.hidden_dim}"


def _check_experts(root: Path, meta: dict, experts: dict[str, Experts]) -> dict[str, ExpertLayout]:
    saved = meta["experts"]
    missing, unknown = sorted(experts.keys() - saved.keys()), sorted(saved.keys() - experts.keys())
    if missing or unknown:
        parts = []
        if missing:
            params = [key_prefix(n) + p for n in missing for p in expert_params(experts[n])]
            parts.append(f"the model's expert parameters {params} are not in the checkpoint")
        if unknown:
            params = [key_prefix(n) + p for n in unknown for p in saved[n]["shard_shapes"]]
            parts.append(f"the checkpoint's expert parameters {params} are not in the model")
        raise ValueError(f"checkpoint {root} does not match the model: " + "; ".join(parts))
    layouts = {}
    for name, m in experts.items():
        entry, prefix = saved[name], key_prefix(name)
        saved_layout = layout_from(entry["layout"])
        if saved_layout.activation != m.layout.activation:
            raise ValueError(
                f"checkpoint {root} does not match the model: expert parameter '{prefix}fc1_weight' has "
                f"activation {saved_layout.activation!r} in the checkpoint but {m.layout.activation!r} in "
                "the model"
            )
        want, have = full_shapes(m.layout, m.has_bias), full_shapes(saved_layout, entry["bias"])
        for pname in [n for n in EXPERT_PARAM_NAMES if n in want or n in have]:
            full = prefix + pname
            if pname not in have:
                raise ValueError(
                    f"checkpoint {root} does not match the model: '{full}' is not in the checkpoint"
                )
            if pname not in want:
                raise ValueError(f"checkpoint {root} does not match the model: '{full}' is not in the model")
            if want[pname] != have[pname]:
                raise ValueError(
                    f"checkpoint {root} does not match the model: expert parameter '{full}' has full shape "
                    f"{have[pname]} ({_describe(saved_layout)}) in the checkpoint but {want[pname]} "
                    f"({_describe(m.layout)}) in the model"
                )
        layouts[name] = saved_layout
    return layouts


def _check_replicated(root: Path, saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    missing = sorted(expected.keys() - saved.keys())
    unknown = sorted(saved.keys() - expected.keys())
    problems = []
    if missing:
        problems.append(f"parameters/buffers missing from the checkpoint: {missing}")
    if unknown:
        problems.append(f"checkpoint parameters/buffers the model does not have: {unknown}")
    for key in sorted(expected.keys() & saved.keys()):
        if tuple(saved[key].shape) != tuple(expected[key].shape):
            problems.append(
                f"'{key}' has shape {tuple(saved[key].shape)} in the checkpoint but "
                f"{tuple(expected[key].shape)} in the model"
            )
    if problems:
        raise ValueError(f"checkpoint {root} does not match the model: " + "; ".join(problems))


def _expert_state(
    shard_files: _RankFiles,
    module_name: str,
    pname: str,
    layout: ExpertLayout,
    saved: ExpertLayout,
    index_maps: IndexMaps,
) -> dict | None:
    """The optimizer state of this rank's shard of one expert parameter, re-sliced."""
    full_name = key_prefix(module_name) + pname
    needed = sorted({rank for e in layout.local_expert_ids for rank, _ in saved_sources(saved, e)})
    states = {rank: shard_files.module(module_name, rank)["optimizer"].get(pname) for rank in needed}
    present = [rank for rank, state in states.items() if state is not None]
    if not present:
        return None
    if len(present) != len(needed):
        absent = sorted(set(needed) - set(present))
        raise ValueError(
            f"corrupt flexmoe checkpoint {shard_files.root}: optimizer state of '{full_name}' is missing for "
            f"saved layout rank(s) {absent}"
        )
    first = states[needed[0]]
    shard_shape = tuple(shard_files.module(module_name, needed[0])["params"][pname].shape)

    def fetch(key: str) -> Callable[[int], torch.Tensor]:
        def get(rank: int) -> torch.Tensor:
            value = states[rank].get(key)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shard_shape:
                raise ValueError(
                    f"corrupt flexmoe checkpoint {shard_files.root}: optimizer state {key!r} of "
                    f"'{full_name}' on saved layout rank {rank} is not a tensor of shape {shard_shape}"
                )
            return value

        return get

    out = {}
    for key, value in first.items():
        if isinstance(value, torch.Tensor) and tuple(value.shape) == shard_shape:
            out[key] = rebuild_shard(layout, saved, pname, fetch(key), index_maps)
        elif isinstance(value, torch.Tensor) and value.numel() <= 1:
            out[key] = value.clone()
        elif isinstance(value, torch.Tensor):
            raise ValueError(
                f"optimizer state {key!r} of '{full_name}' has shape {tuple(value.shape)}, neither the "
                f"shard's shape {shard_shape} nor a scalar: cannot re-slice it to another layout"
            )
        else:
            out[key] = value
    return out


def _optimizer_state(root, model, optimizer, shared, expert_states) -> dict:
    saved = shared["optimizer"]
    if saved is None:
        raise ValueError(f"checkpoint {root} holds no optimizer state (it was saved without an optimizer)")
    names = param_names(model)
    current = optimizer_group_names(optimizer, names)
    saved_groups = saved["param_groups"]
    if len(current) != len(saved_groups):
        raise ValueError(
            f"checkpoint {root}: the optimizer has {len(current)} param group(s), "
            f"the checkpoint {len(saved_groups)}"
        )
    for g, (mine, theirs) in enumerate(zip(current, saved_groups, strict=True)):
        if set(mine) != set(theirs["params"]):
            raise ValueError(
                f"checkpoint {root}: optimizer param group {g} differs: parameters only in the model's "
                f"optimizer {sorted(set(mine) - set(theirs['params']))}, only in the checkpoint "
                f"{sorted(set(theirs['params']) - set(mine))}"
            )
    by_name = {**saved["state"], **expert_states}
    state, param_groups, index = {}, [], 0
    for mine, theirs in zip(current, saved_groups, strict=True):
        ids = []
        for name in mine:
            if name in by_name:
                state[index] = by_name[name]
            ids.append(index)
            index += 1
        param_groups.append({**{k: v for k, v in theirs.items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": param_groups}


def _read_checkpoint(target: Path, model: nn.Module, optimizer, scheduler) -> tuple[dict, dict]:
    """Read, validate and re-slice everything; touch neither the model nor the optimizer."""
    root = files.resolve(target)
    meta = files.read_meta(root)
    if meta.get("version") not in files.READABLE_VERSIONS:
        raise ValueError(
            f"{root}: unsupported flexmoe checkpoint version {meta.get('version')} "
            f"(reads {files.READABLE_VERSIONS})"
        )
    needed = [files.REPLICATED_FILE] + [
        files.expert_file(r) for r in sorted({f for e in meta["experts"].values() for f in e["files"]})
    ]
    missing = [f for f in needed if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"incomplete flexmoe checkpoint {root}: missing {missing}")

    experts = expert_modules(model)
    saved_layouts = _check_experts(root, meta, experts)
    _verify(root, meta, files.REPLICATED_FILE)
    shared = files.read(root / files.REPLICATED_FILE)
    expert_keys = expert_state_keys(experts)
    expected = {k: v for k, v in model.state_dict().items() if k not in expert_keys}
    _check_replicated(root, shared["params"], expected)

    shard_files, index_maps = _RankFiles(root, meta), IndexMaps()
    model_state = dict(shared["params"])
    expert_states = {}
    for name, m in experts.items():
        saved = saved_layouts[name]
        for pname, param in expert_params(m).items():
            full_name = key_prefix(name) + pname

            def fetch(rank, name=name, pname=pname):
                return shard_files.module(name, rank)["params"][pname]

            shard = rebuild_shard(m.layout, saved, pname, fetch, index_maps)
            if shard.shape != param.shape:  # the layout arithmetic guarantees it; a corrupt file may not
                raise ValueError(
                    f"checkpoint {root}: re-sliced '{full_name}' has shape {tuple(shard.shape)}, the model's "
                    f"shard {tuple(param.shape)}"
                )
            model_state[full_name] = shard
            if optimizer is not None and shared.get("optimizer") is not None:
                state = _expert_state(shard_files, name, pname, m.layout, saved, index_maps)
                if state is not None:
                    expert_states[full_name] = state

    optim_state = None
    if optimizer is not None:
        optim_state = _optimizer_state(root, model, optimizer, shared, expert_states)
    if scheduler is not None and shared.get("scheduler") is None:
        raise ValueError(f"checkpoint {root} holds no scheduler state (it was saved without a scheduler)")
    return meta, {
        "model": model_state,
        "optimizer": optim_state,
        "scheduler": shared.get("scheduler"),
        "tuners": shared.get("tuners") or {},  # absent in checkpoints written before tuners were saved
    }


def load_checkpoint(
    path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler=None,
    group=None,
) -> dict:
    """Load a checkpoint written by save_checkpoint at any world size into `model` (and `optimizer`,
    `scheduler`); collective over `group`. Expert shards and their optimizer state are re-sliced to
    each rank's layout; the replicated state is loaded on every rank. Everything is read and checked
    before anything is changed, and if any rank fails, every rank raises and nothing is loaded.
    Returns {"step", "extra", "world_size"} as saved."""
    comm = Comm(group)
    model = unwrap(model)
    error = loaded = None
    try:
        meta, loaded = _read_checkpoint(files.target_path(path), model, optimizer, scheduler)
    except Exception as exc:
        error = exc
    fail_together(comm, error)
    # FSDP2's parameters take their part of the whole tensors (no communication)
    model.load_state_dict(dtensors.distributed_like_model(model, loaded["model"]), strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(dtensors.distributed_optimizer_state(optimizer, loaded["optimizer"]))
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    load_tuner_states(model, loaded["tuners"])
    return {"step": meta["step"], "extra": meta["extra"], "world_size": meta["world_size"]}


def read_extra(path) -> dict:
    """The `extra` a checkpoint was saved with (e.g. the training configuration), without a model:
    enough to rebuild the model before `load_checkpoint`. Not a collective."""
    root = files.resolve(files.target_path(path))
    meta = files.read_meta(root)
    return meta.get("extra") or {}
