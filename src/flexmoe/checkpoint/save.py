"""save_checkpoint: every rank writes its expert shards, the first rank the replicated state and the
metadata, and the directory appears at its path only once every rank has finished."""

from __future__ import annotations

import shutil

import torch
from torch import nn

from flexmoe.checkpoint import dtensors, files, integrity
from flexmoe.checkpoint.collective import Comm, fail_together, gather, on_first_rank
from flexmoe.checkpoint.model_state import (
    check_weights_only,
    compact,
    copy_state,
    expert_modules,
    expert_params,
    expert_state_keys,
    layout_from,
    layout_info,
    optimizer_group_names,
    param_names,
    tuner_states,
    unwrap,
)
from flexmoe.core.experts import Experts


def _expert_payload(experts: dict[str, Experts], optimizer) -> tuple[dict, dict]:
    """This rank's shards and their optimizer state, and a signature the first rank cross-checks."""
    modules, signature = {}, {}
    for name, m in experts.items():
        params = expert_params(m)
        optim = {}
        if optimizer is not None:
            for pname, p in params.items():
                state = optimizer.state.get(p)
                if state:
                    optim[pname] = copy_state(state)
        modules[name] = {
            "layout_rank": m.layout.rank,
            "params": {pname: compact(p) for pname, p in params.items()},
            "optimizer": optim,
        }
        signature[name] = {
            "layout": layout_info(m.layout),
            "layout_rank": m.layout.rank,
            "bias": m.has_bias,
            "shapes": {pname: tuple(p.shape) for pname, p in params.items()},
        }
    return modules, signature


def _expert_index(signatures: list[dict]) -> dict[str, list[int]]:
    """Which checkpoint-group rank writes each layout rank's shard, per Experts module; checks that
    every rank has the same expert modules with the same layouts, and that no shard is missing."""
    first = signatures[0]["experts"]
    for rank, sig in enumerate(signatures):
        if sig["experts"].keys() != first.keys():
            raise ValueError(
                f"ranks 0 and {rank} hold different Experts modules: "
                f"{sorted(first)} vs {sorted(sig['experts'])}"
            )
        if sig["groups"] != signatures[0]["groups"]:
            raise ValueError(f"ranks 0 and {rank} have optimizers over different parameters")
        for name, entry in sig["experts"].items():
            for key in ("layout", "bias"):
                if entry[key] != first[name][key]:
                    raise ValueError(
                        f"Experts module {name!r}: {key} differs between ranks 0 and {rank}: "
                        f"{first[name][key]} vs {entry[key]}"
                    )
    index = {}
    for name, entry in first.items():
        files: list[int | None] = [None] * entry["layout"]["world_size"]
        for rank, sig in enumerate(signatures):
            layout_rank = sig["experts"][name]["layout_rank"]
            if files[layout_rank] is None:
                files[layout_rank] = rank
        missing = [r for r, f in enumerate(files) if f is None]
        if missing:
            raise ValueError(
                f"Experts module {name!r}: no rank of the checkpoint group holds layout rank(s) {missing} "
                f"of its {len(files)}; save over the group the layer was built on"
            )
        index[name] = files
    return index


def save_checkpoint(
    path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler=None,
    step: int = 0,
    extra: dict | None = None,
    group=None,
) -> None:
    """Write a checkpoint directory at `path`; collective over `group` (None = WORLD when
    torch.distributed is initialised, else one process). Every rank writes its expert shards and
    their optimizer state; the first rank writes the replicated parameters, their optimizer state,
    the scheduler state, `step` and `extra` (tensors and plain Python values only). The directory
    appears at `path` (replacing an older checkpoint there) only once every rank has finished."""
    comm = Comm(group)
    target = files.target_path(path)
    model = unwrap(model)
    experts = expert_modules(model)

    # 1. what this rank will write (nothing touches the disk yet)
    error = signature = modules = shared = None
    try:
        names = param_names(model)
        groups = optimizer_group_names(optimizer, names) if optimizer is not None else None
        modules, expert_sig = _expert_payload(experts, optimizer)
        signature = {"experts": expert_sig, "groups": groups}
        whole = dtensors.gathered(model, optimizer)  # FSDP2's shards, whole (every rank takes part)
        if comm.rank == 0:
            shared = _replicated_payload(model, experts, optimizer, scheduler, names, groups, extra, whole)
    except Exception as exc:
        error = exc
    fail_together(comm, error)
    signatures = comm.all_gather(signature)

    # 2. the first rank checks that the ranks agree and prepares the temporary directory
    def prepare():
        index = _expert_index(signatures)
        files.prepare_tmp(target)
        return index

    index = on_first_rank(comm, prepare)
    tmp = files.tmp_dir(target)

    # 3. every rank writes its file (the first rank also the replicated state) and its checksums
    error = written = None
    try:
        mine = {
            name: entry for name, entry in modules.items() if index[name][entry["layout_rank"]] == comm.rank
        }
        payload = {"rank": comm.rank, "world_size": comm.world, "modules": mine}
        written = {files.expert_file(comm.rank): _write(payload, tmp / files.expert_file(comm.rank))}
        if comm.rank == 0:
            written[files.REPLICATED_FILE] = _write(shared, tmp / files.REPLICATED_FILE)
    except Exception as exc:
        error = exc
    try:
        every = gather(comm, error, written)  # doubles as the barrier before the metadata
    except Exception:
        if comm.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise

    # 4. the metadata last (a directory without it is never a checkpoint), then into place; nobody
    # returns before it is there
    def finish() -> None:
        meta = {
            "format": files.FORMAT,
            "version": files.VERSION,
            "world_size": comm.world,
            "step": int(step),
            "extra": extra,
            "torch_version": str(torch.__version__),
            "experts": {
                name: {
                    "layout": entry["layout"],
                    "shards_per_expert": layout_from(entry["layout"]).shards_per_expert,
                    "bias": entry["bias"],
                    "shard_shapes": entry["shapes"],
                    "files": index[name],
                }
                for name, entry in signatures[0]["experts"].items()
            },
            "replicated": {k: tuple(v.shape) for k, v in shared["params"].items()},
            "has_optimizer": optimizer is not None,
            "has_scheduler": scheduler is not None,
            "checksums": {name: record for rank_files in every for name, record in rank_files.items()},
        }
        try:
            files.write(meta, tmp / files.META_FILE)
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        files.publish(tmp, target)

    on_first_rank(comm, finish)


def _write(obj, file) -> dict:
    """Write one file; its size, digest and tensor digests as read back from the disk."""
    files.write(obj, file)
    return integrity.record(file, obj)


def _replicated_payload(model, experts, optimizer, scheduler, names, groups, extra, whole) -> dict:
    """`whole`: the DTensor entries gathered whole (dtensors.gathered), saved instead of the shards."""
    if extra is not None:
        check_weights_only(extra, "extra")
    expert_keys = expert_state_keys(experts)
    whole_params, whole_optim = whole
    state_dict = {**model.state_dict(), **whole_params}
    params = {k: compact(v) for k, v in state_dict.items() if k not in expert_keys}
    optim = None
    if optimizer is not None:
        expert_ids = {id(p) for m in experts.values() for p in expert_params(m).values()}
        state = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in expert_ids and optimizer.state.get(p):
                    name = names[id(p)]
                    state[name] = copy_state(whole_optim.get(name, optimizer.state[p]))
        hyper = [
            {k: v for k, v in group.items() if k not in ("params", "param_names")}
            for group in optimizer.param_groups
        ]
        check_weights_only(hyper, "the optimizer's param group settings")
        optim = {
            "param_groups": [
                {**h, "params": group_names} for h, group_names in zip(hyper, groups, strict=True)
            ],
            "state": state,
        }
    sched = None
    if scheduler is not None:
        sched = scheduler.state_dict()
        check_weights_only(sched, "the scheduler's state_dict")
    return {"params": params, "optimizer": optim, "scheduler": sched, "tuners": tuner_states(model)}
