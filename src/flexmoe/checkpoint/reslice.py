"""Re-slicing expert shards from the layout they were saved with to the layout that loads them: each
needed expert is reassembled from the saved shards that hold it and cut with the loading layout. Both
directions take their slices from ExpertLayout.shard_expert applied to index tensors, so the layout
stays the only place that knows how an expert is cut."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from flexmoe.checkpoint.model_state import full_shapes
from flexmoe.core.layout import ExpertLayout


class IndexMaps:
    """For a layout: the flat indices into one whole expert that its shard holds, per parameter name
    (ExpertLayout.shard_expert applied to arange tensors). Cached for the duration of one load."""

    def __init__(self):
        self._cache: dict[ExpertLayout, dict[str, torch.Tensor]] = {}

    def __call__(self, layout: ExpertLayout) -> dict[str, torch.Tensor]:
        if layout not in self._cache:
            full = {}
            for name, shape in full_shapes(layout, bias=True).items():
                one = shape[1:]
                full[name] = torch.arange(math.prod(one)).view(one)
            self._cache[layout] = layout.shard_expert(full)
        return self._cache[layout]


def saved_sources(saved: ExpertLayout, expert: int) -> list[tuple[int, int]]:
    """(layout rank, local index) of every saved shard of `expert`, in shard order."""
    s = saved.shards_per_expert
    if s > 1:
        return [(expert * s + i, 0) for i in range(s)]
    return [(expert // saved.local_experts, expert % saved.local_experts)]


def rebuild_shard(
    layout: ExpertLayout,
    saved: ExpertLayout,
    name: str,
    fetch: Callable[[int], torch.Tensor],
    index_maps: IndexMaps | None = None,
) -> torch.Tensor:
    """This layout's shard [E_local, ...] of expert tensor `name` (or of a state tensor shaped like
    it), from the saved layout's shards: fetch(layout_rank) gives that saved rank's [E_local_s, ...]."""
    index_maps = index_maps or IndexMaps()
    pieces = []
    for expert in layout.local_expert_ids:
        sources = saved_sources(saved, expert)
        parts = [fetch(rank)[local] for rank, local in sources]
        if len(parts) == 1:
            whole = parts[0]
        else:
            one = full_shapes(saved, bias=True)[name][1:]
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
