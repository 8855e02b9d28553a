"""Sharded, atomic checkpoints that load at any world size (DESIGN section 8).

A checkpoint is a directory:

    <path>/meta.pt            format, version, saving world size W, step, extra, and for every Experts
                              module: its layout metadata (E, M, H, activation, W_e, s), whether it has
                              biases, the shard shapes, and which file holds each layout rank's shard
    <path>/replicated.pt      the replicated (non-expert) entries of the model's state_dict, their
                              optimizer state keyed by parameter NAME, the optimizer's param groups
                              (hyper-parameters, parameter names), the scheduler state
    <path>/experts-00003.pt   what rank 3 of the checkpoint group holds: per Experts module its
                              shards (fc1_weight [E_local, M, X], ...) and their optimizer state

Every file is written with torch.save and read back with torch.load(weights_only=True). Saving goes
to a temporary directory next to the target (`.<name>.tmp`), which is renamed into place after every
rank has written its file; an older checkpoint at the target is moved aside (`.<name>.old`) for the
instant between the two renames and deleted after. Loading re-slices: for every expert a rank needs
under its own layout, the whole expert is reassembled from the saved shards that hold it (one expert
at a time, reading only the files that hold it) and sliced with the loading layout, and so is every
optimizer state tensor shaped like the shard (AdamW's exp_avg, exp_avg_sq); scalar states (step)
are copied. Both directions take their slices from ExpertLayout.shard_expert (applied to index
tensors), so the layout stays the only place that knows how an expert is cut.

Why torch.save files and not torch.distributed.checkpoint: the shards are not plain chunks of a
global tensor (swiglu's fc1 holds the gate and up slices side by side, fc2_bias is cut along M), so
DCP would need a custom planner to re-slice them, while per-rank files plus the layout's own slicing
make re-slicing explicit, testable on one process, and need nothing but torch.save/torch.load.

Legend: E experts, E_local experts per rank, M model dim, H hidden dim, X fc1 width (H, or 2H for
swiglu), W ranks of the checkpoint group, W_e ranks of a layer's layout, s = max(1, W_e / E).
"""

from __future__ import annotations

import io
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from flexmoe.experts import EXPERT_PARAM_NAMES, Experts
from flexmoe.layout import ExpertLayout

FORMAT = "flexmoe.checkpoint"
VERSION = 1
META_FILE = "meta.pt"
REPLICATED_FILE = "replicated.pt"

_ERROR_TYPES = {cls.__name__: cls for cls in (ValueError, FileNotFoundError, FileExistsError, KeyError)}


def expert_file(rank: int) -> str:
    return f"experts-{rank:05d}.pt"


# -- process group ----------------------------------------------------------------------------------
class _Comm:
    """The few object collectives a save or load needs; no-ops on a single process."""

    def __init__(self, group):
        self.group = group
        if group is None and not (dist.is_available() and dist.is_initialized()):
            self.world, self.rank = 1, 0
        else:
            self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def all_gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        src = dist.get_global_rank(self.group or dist.group.WORLD, 0)
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]


def _report(error: BaseException | None):
    return None if error is None else (type(error).__name__, str(error))


def _raise_reported(reports: list) -> None:
    for rank, report in enumerate(reports):
        if report is not None:
            kind, message = report
            raise _ERROR_TYPES.get(kind, RuntimeError)(f"rank {rank}: {message}")


def _agree(comm: _Comm, error: BaseException | None) -> None:
    """Every rank learns whether any rank failed, and all of them raise (a lone failure would leave the
    other ranks waiting in the next collective). The failing rank raises its own exception."""
    reports = comm.all_gather(_report(error))
    if error is not None:
        raise error
    _raise_reported(reports)


def _on_first_rank(comm: _Comm, fn: Callable[[], object]):
    """Run fn on the group's first rank; every rank gets its result or raises its error."""
    value = error = None
    if comm.rank == 0:
        try:
            value = fn()
        except Exception as exc:
            error = exc
    report, value = comm.broadcast((_report(error), value))
    if error is not None:
        raise error
    _raise_reported([report])
    return value


# -- model structure --------------------------------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    """A DDP-style wrapper keeps the model in `.module`; names are saved without its prefix."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def _expert_modules(model: nn.Module) -> dict[str, Experts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Experts)}


def _prefix(module_name: str) -> str:
    return f"{module_name}." if module_name else ""


def _expert_params(module: Experts) -> dict[str, nn.Parameter]:
    return {n: p for n in EXPERT_PARAM_NAMES if (p := getattr(module, n, None)) is not None}


def _expert_keys(experts: dict[str, Experts]) -> set[str]:
    """state_dict keys owned by Experts modules (sharded, so never saved as replicated)."""
    return {_prefix(name) + key for name, m in experts.items() for key in m.state_dict(keep_vars=True)}


def _layout_info(layout: ExpertLayout) -> dict:
    info = layout.metadata()
    info.pop("shards_per_expert")  # derived; kept in the module entry for readers of meta.pt
    return info


def _layout_from(info: dict, rank: int = 0) -> ExpertLayout:
    return ExpertLayout(
        num_experts=info["num_experts"],
        model_dim=info["model_dim"],
        hidden_dim=info["hidden_dim"],
        world_size=info["world_size"],
        rank=rank,
        activation=info["activation"],
    )


def _full_shapes(layout: ExpertLayout, bias: bool) -> dict[str, tuple[int, ...]]:
    """Shapes of the unsharded [E, ...] expert tensors."""
    E, M, H = layout.num_experts, layout.model_dim, layout.hidden_dim
    X = 2 * H if layout.activation == "swiglu" else H
    shapes = {"fc1_weight": (E, M, X), "fc1_bias": (E, X), "fc2_weight": (E, H, M), "fc2_bias": (E, M)}
    return {k: v for k, v in shapes.items() if bias or not k.endswith("bias")}


def _compact(t: torch.Tensor) -> torch.Tensor:
    """torch.save writes a view's whole storage; save a view as its own tensor."""
    t = t.detach()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _copy_state(state: dict) -> dict:
    return {k: _compact(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def _optimizer_group_names(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[list[str]]:
    groups = []
    for g, group in enumerate(optimizer.param_groups):
        group_names = []
        for i, p in enumerate(group["params"]):
            if id(p) not in names:
                raise ValueError(
                    f"optimizer param group {g}, parameter {i} (shape {tuple(p.shape)}) is not a "
                    "parameter of the model"
                )
            group_names.append(names[id(p)])
        groups.append(group_names)
    return groups


def _check_weights_only(obj, what: str) -> None:
    """Fail at save time, not at load time, on objects torch.load(weights_only=True) refuses."""
    buffer = io.BytesIO()
    try:
        torch.save(obj, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{what} must hold only tensors and plain Python values (dict, list, tuple, str, int, "
            f"float, bool, None) so that it loads with weights_only=True: {exc}"
        ) from None


# -- files ------------------------------------------------------------------------------------------
def _write(obj, file: Path) -> None:
    with open(file, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _read(file: Path, *, mmap: bool = False):
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise FileNotFoundError(f"incomplete flexmoe checkpoint: {file} is missing") from None
    except Exception as exc:
        raise ValueError(f"cannot read flexmoe checkpoint file {file}: {exc}") from None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _target(path) -> Path:
    target = Path(os.path.abspath(os.fspath(path)))
    if target.name in ("", ".", ".."):
        raise ValueError(f"checkpoint path must name a directory, got {os.fspath(path)!r}")
    return target


def _tmp_dir(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp")


def _backup_dir(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _is_checkpoint(directory: Path) -> bool:
    return directory.is_dir() and (directory / META_FILE).is_file()


def _prepare_tmp(target: Path) -> None:
    """First rank, before anyone writes: a clean temporary directory next to the target."""
    target.parent.mkdir(parents=True, exist_ok=True)
    backup = _backup_dir(target)
    if not target.exists() and _is_checkpoint(backup):
        os.rename(backup, target)  # a previous save stopped between its two renames
    if target.exists() and not _is_checkpoint(target) and not (target.is_dir() and not any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not a flexmoe checkpoint; refusing to replace it")
    tmp = _tmp_dir(target)
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a save that failed or was killed
    tmp.mkdir()


def _publish(tmp: Path, target: Path) -> None:
    """First rank, after every rank has written: move the finished directory into place."""
    backup = _backup_dir(target)
    if backup.exists():
        shutil.rmtree(backup)
    if target.exists():
        os.rename(target, backup)
    os.rename(tmp, target)
    _fsync_dir(target.parent)
    if backup.exists():
        shutil.rmtree(backup)


# -- save -------------------------------------------------------------------------------------------
def _expert_payload(experts: dict[str, Experts], optimizer) -> tuple[dict, dict]:
    """This rank's shards and their optimizer state, and a signature the first rank cross-checks."""
    modules, signature = {}, {}
    for name, m in experts.items():
        params = _expert_params(m)
        optim = {}
        if optimizer is not None:
            for pname, p in params.items():
                state = optimizer.state.get(p)
                if state:
                    optim[pname] = _copy_state(state)
        modules[name] = {
            "layout_rank": m.layout.rank,
            "params": {pname: _compact(p) for pname, p in params.items()},
            "optimizer": optim,
        }
        signature[name] = {
            "layout": _layout_info(m.layout),
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
    comm = _Comm(group)
    target = _target(path)
    model = _unwrap(model)
    experts = _expert_modules(model)

    # 1. what this rank will write (nothing touches the disk yet)
    error = signature = modules = shared = None
    try:
        names = _param_names(model)
        groups = _optimizer_group_names(optimizer, names) if optimizer is not None else None
        modules, expert_sig = _expert_payload(experts, optimizer)
        signature = {"experts": expert_sig, "groups": groups}
        if comm.rank == 0:
            shared = _replicated_payload(model, experts, optimizer, scheduler, names, groups, extra)
    except Exception as exc:
        error = exc
    _agree(comm, error)
    signatures = comm.all_gather(signature)

    # 2. the first rank checks that the ranks agree and prepares the temporary directory
    def prepare():
        index = _expert_index(signatures)
        _prepare_tmp(target)
        return index

    index = _on_first_rank(comm, prepare)
    tmp = _tmp_dir(target)

    # 3. every rank writes its file; the first rank also the replicated state and the metadata
    error = None
    try:
        mine = {
            name: entry for name, entry in modules.items() if index[name][entry["layout_rank"]] == comm.rank
        }
        _write({"rank": comm.rank, "world_size": comm.world, "modules": mine}, tmp / expert_file(comm.rank))
        if comm.rank == 0:
            _write(shared, tmp / REPLICATED_FILE)
            meta = {
                "format": FORMAT,
                "version": VERSION,
                "world_size": comm.world,
                "step": int(step),
                "extra": extra,
                "torch_version": str(torch.__version__),
                "experts": {
                    name: {
                        "layout": entry["layout"],
                        "shards_per_expert": _layout_from(entry["layout"]).shards_per_expert,
                        "bias": entry["bias"],
                        "shard_shapes": entry["shapes"],
                        "files": index[name],
                    }
                    for name, entry in signatures[0]["experts"].items()
                },
                "replicated": {k: tuple(v.shape) for k, v in shared["params"].items()},
                "has_optimizer": optimizer is not None,
                "has_scheduler": scheduler is not None,
            }
            _write(meta, tmp / META_FILE)
    except Exception as exc:
        error = exc
    try:
        _agree(comm, error)  # doubles as the barrier before the rename
    except Exception:
        if comm.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise

    # 4. into place, and nobody returns before it is there
    _on_first_rank(comm, lambda: _publish(tmp, target))


def _replicated_payload(model, experts, optimizer, scheduler, names, groups, extra) -> dict:
    if extra is not None:
        _check_weights_only(extra, "extra")
    expert_keys = _expert_keys(experts)
    params = {k: _compact(v) for k, v in model.state_dict().items() if k not in expert_keys}
    optim = None
    if optimizer is not None:
        expert_ids = {id(p) for m in experts.values() for p in _expert_params(m).values()}
        state = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in expert_ids and optimizer.state.get(p):
                    state[names[id(p)]] = _copy_state(optimizer.state[p])
        hyper = [
            {k: v for k, v in group.items() if k not in ("params", "param_names")}
            for group in optimizer.param_groups
        ]
        _check_weights_only(hyper, "the optimizer's param group settings")
        optim = {
            "param_groups": [
                {**h, "params": group_names} for h, group_names in zip(hyper, groups, strict=True)
            ],
            "state": state,
        }
    sched = None
    if scheduler is not None:
        sched = scheduler.state_dict()
        _check_weights_only(sched, "the scheduler's state_dict")
    return {"params": params, "optimizer": optim, "scheduler": sched}


# -- re-slicing -------------------------------------------------------------------------------------
class _IndexMaps:
    """For a layout: the flat indices into one whole expert that its shard holds, per parameter name
    (ExpertLayout.shard_expert applied to arange tensors). Cached for the duration of one load."""

    def __init__(self):
        self._cache: dict[ExpertLayout, dict[str, torch.Tensor]] = {}

    def __call__(self, layout: ExpertLayout) -> dict[str, torch.Tensor]:
        if layout not in self._cache:
            full = {}
            for name, shape in _full_shapes(layout, bias=True).items():
                one = shape[1:]
                full[name] = torch.arange(math.prod(one)).view(one)
            self._cache[layout] = layout.shard_expert(full)
        return self._cache[layout]


def _sources(saved: ExpertLayout, expert: int) -> list[tuple[int, int]]:
    """(layout rank, local index) of every saved shard of `expert`, in shard order."""
    s = saved.shards_per_expert
    if s > 1:
        return [(expert * s + i, 0) for i in range(s)]
    return [(expert // saved.local_experts, expert % saved.local_experts)]


def _rebuild_shard(
    layout: ExpertLayout,
    saved: ExpertLayout,
    name: str,
    fetch: Callable[[int], torch.Tensor],
    index_maps: _IndexMaps | None = None,
) -> torch.Tensor:
    """This layout's shard [E_local, ...] of expert tensor `name` (or of a state tensor shaped like
    it), from the saved layout's shards: fetch(layout_rank) gives that saved rank's [E_local_s, ...]."""
    index_maps = index_maps or _IndexMaps()
    pieces = []
    for expert in layout.local_expert_ids:
        sources = _sources(saved, expert)
        parts = [fetch(rank)[local] for rank, local in sources]
        if len(parts) == 1:
            whole = parts[0]
        else:
            one = _full_shapes(saved, bias=True)[name][1:]
            flat = parts[0].new_empty(math.prod(one))
            for (rank, _), part in zip(sources, parts, strict=True):
                idx = index_maps(saved.for_rank(rank))[name]
                if part.shape != idx.shape:
                    raise ValueError(
                        f"saved shard of {name} on layout rank {rank} has shape {tuple(part.shape)}, "
                        f"expected {tuple(idx.shape)}"
                    )
                flat[idx.reshape(-1)] = part.reshape(-1)
            whole = flat.view(one)
        if layout.shards_per_expert == 1:
            pieces.append(whole)
        else:
            pieces.append(whole.reshape(-1)[index_maps(layout)[name]])
    return torch.stack(pieces)


# -- load -------------------------------------------------------------------------------------------
def _resolve(target: Path) -> Path:
    if target.is_dir():
        if not (target / META_FILE).is_file():
            raise FileNotFoundError(f"{target} is not a complete flexmoe checkpoint: {META_FILE} is missing")
        return target
    if target.exists():
        raise ValueError(f"{target} is not a directory; a flexmoe checkpoint is a directory")
    backup = _backup_dir(target)
    if _is_checkpoint(backup):
        return backup  # a save stopped between moving the old checkpoint aside and the new one in
    raise FileNotFoundError(f"no flexmoe checkpoint at {target}")


class _RankFiles:
    """The saved expert files, each read (memory-mapped) the first time a shard in it is needed."""

    def __init__(self, root: Path, meta: dict):
        self.root, self.meta, self._files = root, meta, {}

    def module(self, module_name: str, layout_rank: int) -> dict:
        file_rank = self.meta["experts"][module_name]["files"][layout_rank]
        if file_rank not in self._files:
            self._files[file_rank] = _read(self.root / expert_file(file_rank), mmap=True)
        entry = self._files[file_rank].get("modules", {}).get(module_name)
        if entry is None or entry.get("layout_rank") != layout_rank:
            raise ValueError(
                f"corrupt flexmoe checkpoint {self.root}: {expert_file(file_rank)} does not hold layout "
                f"rank {layout_rank} of Experts module {module_name!r}"
            )
        return entry


def _describe(layout: ExpertLayout) -> str:
    return f"num_experts={layout.num_experts}, model_dim={layout.model_dim}, hidden_dim={layout.hidden_dim}"


def _check_experts(root: Path, meta: dict, experts: dict[str, Experts]) -> dict[str, ExpertLayout]:
    saved = meta["experts"]
    missing, unknown = sorted(experts.keys() - saved.keys()), sorted(saved.keys() - experts.keys())
    if missing or unknown:
        parts = []
        if missing:
            params = [_prefix(n) + p for n in missing for p in _expert_params(experts[n])]
            parts.append(f"the model's expert parameters {params} are not in the checkpoint")
        if unknown:
            params = [_prefix(n) + p for n in unknown for p in saved[n]["shard_shapes"]]
            parts.append(f"the checkpoint's expert parameters {params} are not in the model")
        raise ValueError(f"checkpoint {root} does not match the model: " + "; ".join(parts))
    layouts = {}
    for name, m in experts.items():
        entry, prefix = saved[name], _prefix(name)
        saved_layout = _layout_from(entry["layout"])
        if saved_layout.activation != m.layout.activation:
            raise ValueError(
                f"checkpoint {root} does not match the model: expert parameter '{prefix}fc1_weight' has "
                f"activation {saved_layout.activation!r} in the checkpoint but {m.layout.activation!r} in "
                "the model"
            )
        want, have = _full_shapes(m.layout, m.has_bias), _full_shapes(saved_layout, entry["bias"])
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
    files: _RankFiles,
    module_name: str,
    pname: str,
    layout: ExpertLayout,
    saved: ExpertLayout,
    index_maps: _IndexMaps,
) -> dict | None:
    """The optimizer state of this rank's shard of one expert parameter, re-sliced."""
    full_name = _prefix(module_name) + pname
    needed = sorted({rank for e in layout.local_expert_ids for rank, _ in _sources(saved, e)})
    states = {rank: files.module(module_name, rank)["optimizer"].get(pname) for rank in needed}
    present = [rank for rank, state in states.items() if state is not None]
    if not present:
        return None
    if len(present) != len(needed):
        absent = sorted(set(needed) - set(present))
        raise ValueError(
            f"corrupt flexmoe checkpoint {files.root}: optimizer state of '{full_name}' is missing for "
            f"saved layout rank(s) {absent}"
        )
    first = states[needed[0]]
    shard_shape = tuple(files.module(module_name, needed[0])["params"][pname].shape)

    def fetch(key: str) -> Callable[[int], torch.Tensor]:
        def get(rank: int) -> torch.Tensor:
            value = states[rank].get(key)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shard_shape:
                raise ValueError(
                    f"corrupt flexmoe checkpoint {files.root}: optimizer state {key!r} of '{full_name}' "
                    f"on saved layout rank {rank} is not a tensor of shape {shard_shape}"
                )
            return value

        return get

    out = {}
    for key, value in first.items():
        if isinstance(value, torch.Tensor) and tuple(value.shape) == shard_shape:
            out[key] = _rebuild_shard(layout, saved, pname, fetch(key), index_maps)
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
    names = _param_names(model)
    current = _optimizer_group_names(optimizer, names)
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
    root = _resolve(target)
    meta = _read(root / META_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{root / META_FILE} is not flexmoe checkpoint metadata")
    if meta.get("version") != VERSION:
        raise ValueError(
            f"{root}: unsupported flexmoe checkpoint version {meta.get('version')} (reads {VERSION})"
        )
    needed = [REPLICATED_FILE] + [
        expert_file(r) for r in sorted({f for e in meta["experts"].values() for f in e["files"]})
    ]
    missing = [f for f in needed if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"incomplete flexmoe checkpoint {root}: missing {missing}")

    experts = _expert_modules(model)
    saved_layouts = _check_experts(root, meta, experts)
    shared = _read(root / REPLICATED_FILE)
    expert_keys = _expert_keys(experts)
    expected = {k: v for k, v in model.state_dict().items() if k not in expert_keys}
    _check_replicated(root, shared["params"], expected)

    files, index_maps = _RankFiles(root, meta), _IndexMaps()
    model_state = dict(shared["params"])
    expert_states = {}
    for name, m in experts.items():
        saved = saved_layouts[name]
        for pname, param in _expert_params(m).items():
            full_name = _prefix(name) + pname

            def fetch(rank, name=name, pname=pname):
                return files.module(name, rank)["params"][pname]

            shard = _rebuild_shard(m.layout, saved, pname, fetch, index_maps)
            if shard.shape != param.shape:  # the layout arithmetic guarantees it; a corrupt file may not
                raise ValueError(
                    f"checkpoint {root}: re-sliced '{full_name}' has shape {tuple(shard.shape)}, the model's "
                    f"shard {tuple(param.shape)}"
                )
            model_state[full_name] = shard
            if optimizer is not None and shared.get("optimizer") is not None:
                state = _expert_state(files, name, pname, m.layout, saved, index_maps)
                if state is not None:
                    expert_states[full_name] = state

    optim_state = None
    if optimizer is not None:
        optim_state = _optimizer_state(root, model, optimizer, shared, expert_states)
    if scheduler is not None and shared.get("scheduler") is None:
        raise ValueError(f"checkpoint {root} holds no scheduler state (it was saved without a scheduler)")
    return meta, {"model": model_state, "optimizer": optim_state, "scheduler": shared.get("scheduler")}


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
    comm = _Comm(group)
    model = _unwrap(model)
    error = loaded = None
    try:
        meta, loaded = _read_checkpoint(_target(path), model, optimizer, scheduler)
    except Exception as exc:
        error = exc
    _agree(comm, error)
    model.load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    return {"step": meta["step"], "extra": meta["extra"], "world_size": meta["world_size"]}


def read_extra(path) -> dict:
    """The `extra` a checkpoint was saved with (e.g. the training configuration), without a model:
    enough to rebuild the model before `load_checkpoint`. Not a collective."""
    root = _resolve(_target(path))
    meta = _read(root / META_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{root / META_FILE} is not flexmoe checkpoint metadata")
    return meta.get("extra") or {}
