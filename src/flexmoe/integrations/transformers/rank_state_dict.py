"""A lazy state dict of a safetensors checkpoint for transformers' own loader, under which a rank
reads only what it keeps: its experts, its FSDP2 shard of the rest.

Legend: E experts, L = E / W local experts, W ranks of the EP group, R rows of one expert's fused
matrix (2I for gate + up), P parts fused into it (gate, up).

Under a DistributedConfig, transformers builds the model on the meta device, shards it, then asks
each checkpoint entry for this rank's slice only (its shard-on-read): a stored fused [E, R, ...]
tensor (GPT-OSS) is cut to the rank's L experts on dim 0, a dense one to its FSDP2 rows. Per-expert
checkpoints (Qwen-MoE, Mixtral, DeepSeek: `...experts.{e}.gate_proj.weight`) are fused by its
converters instead, and its loader reads all of a rank's pieces at once in a thread pool before it
stacks and concatenates them, so that a rank holds its experts two to three times over. Here every
entry is a lazy slice, and each fused expert parameter appears under its own model name as one entry
that reads a rank's L experts, part after part, straight into the [L, R, ...] tensor the model
keeps: the rank's peak is its experts plus its share of the rest, once. Everything else (renaming,
the other conversions, placements, tied weights, buffers, the loading report) stays transformers'.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from flexmoe.integrations.transformers.safetensors_files import DTYPES, StoredTensor, checkpoint_tensors

_TORCH_TO_SAFETENSORS = {dtype: name for name, dtype in DTYPES.items()}


class LazyRows:
    """A tensor that is read when sliced, like a safetensors slice (the interface transformers' loader
    takes): only the rows of dim 0 that an index asks for are read; other dims are cut after."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        return _TORCH_TO_SAFETENSORS[self.dtype]

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def _read(self, start: int, stop: int, out: torch.Tensor) -> None:
        raise NotImplementedError

    def __getitem__(self, index) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        if any(part is Ellipsis for part in index):
            at = next(i for i, part in enumerate(index) if part is Ellipsis)
            fill = (slice(None),) * (len(self.shape) - len(index) + 1)
            index = index[:at] + fill + index[at + 1 :]
        if not self.shape:  # a 0-dim tensor
            if index:
                raise ValueError(f"{self.name} is 0-dim; index {index} does not apply")
            out = torch.empty((), dtype=self.dtype)
            self._read(0, 1, out)
            return out
        first = index[0] if index else slice(None)
        if isinstance(first, slice) and first.step in (None, 1):
            start, stop, _ = first.indices(self.shape[0])
            stop, rest = max(start, stop), (slice(None), *index[1:])
        else:  # anything but a plain row range: read every row, then index as asked
            start, stop, rest = 0, self.shape[0], index
        out = torch.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        self._read(start, stop, out)
        whole = all(isinstance(part, slice) and part == slice(None) for part in rest)
        return out if whole else out[rest]


class StoredRows(LazyRows):
    """One tensor as stored in the checkpoint."""

    def __init__(self, stored: StoredTensor):
        super().__init__(stored.name, stored.shape, stored.dtype)
        self.stored = stored

    def _read(self, start: int, stop: int, out: torch.Tensor) -> None:
        self.stored.read_rows(start, stop, out)


class StackedExperts(LazyRows):
    """A fused experts parameter [E, R, ...] of per-expert checkpoint tensors: expert e is its P parts
    (each [R_p, ...], e.g. gate then up) one after another on its dim 0, as transformers fuses them."""

    def __init__(self, name: str, parts_EP: list[list[StoredTensor]]):
        first = parts_EP[0]
        inner, dtype = first[0].shape[1:], first[0].dtype
        for parts in parts_EP:
            for part, ref in zip(parts, first, strict=True):
                if part.shape != ref.shape or part.dtype != dtype or part.shape[1:] != inner:
                    raise ValueError(
                        f"{part.name} is {part.dtype} {list(part.shape)}; {ref.name} is {ref.dtype} "
                        f"{list(ref.shape)}: the experts of {name} do not stack"
                    )
        super().__init__(name, (len(parts_EP), sum(p.shape[0] for p in first), *inner), dtype)
        self.parts_EP = parts_EP

    def _read(self, start: int, stop: int, out: torch.Tensor) -> None:
        for e in range(start, stop):
            row = 0
            for part in self.parts_EP[e]:
                rows = part.shape[0]
                part.read_rows(0, rows, out[e - start, row : row + rows])  # a contiguous block of out
                row += rows


def _stacking_targets(
    model: nn.Module, names: list[str], key_mapping: dict[str, str] | None
) -> dict[str, tuple[str, list[str], str]]:
    """checkpoint name -> (model parameter, the converter's source patterns in fusing order, the one
    that matched it) for every name that transformers' own conversion mapping stacks per expert on
    dim 0 (MergeModulelist(0)), then, for several parts, concatenates on dim 1 (Concatenate(1)). The
    one place that relies on transformers' loading internals (its conversion mapping and key
    renaming, 5.24); names under any other conversion stay for transformers to convert."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        Concatenate,
        MergeModulelist,
        WeightConverter,
        WeightRenaming,
        rename_source_key,
    )

    mapping = get_model_conversion_mapping(model, key_mapping)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    model_names, params = model.state_dict(), dict(model.named_parameters())
    targets = {}
    for name in names:
        target, pattern = rename_source_key(name, renamings, converters, model.base_model_prefix, model_names)
        if pattern is None or target not in params:
            continue
        converter = by_pattern[pattern]
        ops, patterns = converter.operations, list(converter.source_patterns)
        stacks = bool(ops) and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
        if len(patterns) == 1:
            plain = stacks and len(ops) == 1
        else:
            plain = stacks and len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim == 1
        if plain:
            targets[name] = (target, patterns, pattern)
    return targets


def _natural_key(name: str) -> tuple:
    # the order transformers' loader lists a converter's pieces in: numbers by value (expert 10 after 9)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def rank_state_dict(
    path: str | Path, model: nn.Module, *, key_mapping: dict[str, str] | None = None
) -> dict[str, LazyRows]:
    """The checkpoint in the local directory `path` as lazy entries for
    `model_class.from_pretrained(None, config=..., state_dict=...)`: per-expert tensors that
    transformers would stack into one of `model`'s parameters (`model`: a meta-device model of the
    checkpoint's config) under that parameter's name, every other tensor under its own name.
    `key_mapping` as from_pretrained takes it. Raises ValueError for a fused parameter whose experts
    are missing or do not stack."""
    stored = checkpoint_tensors(path)
    targets = _stacking_targets(model, sorted(stored, key=_natural_key), key_mapping)
    pieces: dict[str, dict[str, list[StoredTensor]]] = defaultdict(lambda: defaultdict(list))
    patterns_of: dict[str, list[str]] = {}
    for name in sorted(targets, key=_natural_key):
        target, patterns, pattern = targets[name]
        pieces[target][pattern].append(stored[name])
        patterns_of[target] = patterns
    state: dict[str, LazyRows] = {name: StoredRows(t) for name, t in stored.items() if name not in targets}
    for target, by_pattern in pieces.items():
        E = model.get_parameter(target).shape[0]
        for pattern in patterns_of[target]:
            found = len(by_pattern.get(pattern, []))
            if found != E:
                raise ValueError(
                    f"checkpoint at {str(path)!r}: {found} tensors match {pattern!r} for {target}, "
                    f"whose model has {E} experts"
                )
        parts_EP = [[by_pattern[p][e] for p in patterns_of[target]] for e in range(E)]
        state[target] = StackedExperts(target, parts_EP)
    return state


__all__ = ["LazyRows", "StackedExperts", "StoredRows", "rank_state_dict"]
