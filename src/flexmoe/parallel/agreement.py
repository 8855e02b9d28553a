"""Agreement across ranks in ONE fixed-size collective.

Ranks that disagree on a layer's shapes or on the plan of a step would issue mismatched collectives,
which gloo answers with an abort and NCCL with a hang. So before any token moves, every rank
all-reduces (MAX) the same fixed-length int64 vector: the fields that must be equal everywhere, each
also bitwise negated (which gives their minimum), then the values whose group maximum every rank
takes (e.g. the capacity). The vector's length never depends on a field's value (a forced plan and an
adaptive step send the same number of elements), so the check itself can never be the mismatched
collective. On a difference, every rank sees it in the same reduced vector, gathers every rank's
fields and raises the same ValueError naming each differing field and every rank's value.

Legend: W ranks, K fields, X values agreed by maximum.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flexmoe.parallel.comm import FinishedWork, all_gather_flat, all_reduce_max, control_device

__all__ = ["Field", "agree_fields", "choice_field", "config_fields", "float_field", "int_field"]

# The code of "not set" (None, "adaptive") in int fields that are otherwise >= 0.
UNSET = -1


@dataclass(frozen=True)
class Field:
    """One value every rank must hold: its name, its int64 code and how to show a code."""

    name: str
    code: int
    show: Callable[[int], str] = str


def int_field(name: str, value: int | None, unset: str = "None") -> Field:
    """An int >= 0, or None/"adaptive" (shown as `unset`)."""
    code = UNSET if value is None or isinstance(value, str) else int(value)
    return Field(name, code, lambda c: unset if c == UNSET else str(c))


def float_field(name: str, value: float | None) -> Field:
    """A float, compared bit for bit (its IEEE-754 bits as an int64)."""
    # every rank shows every rank's code with its own Field, so one `show` must serve None and floats
    code = UNSET if value is None else struct.unpack("<q", struct.pack("<d", float(value)))[0]
    return Field(name, code, lambda c: "None" if c == UNSET else repr(_bits_to_float(c)))


def choice_field(name: str, value: object, accepted: Sequence[object]) -> Field:
    """One of a fixed tuple of values (strings, dtypes, bools), by its index."""
    accepted = tuple(accepted)
    code = accepted.index(value) if value in accepted else len(accepted)
    return Field(name, code, lambda c: repr(accepted[c]) if 0 <= c < len(accepted) else "<other>")


def config_fields(config) -> list[Field]:
    """One Field per field of a config dataclass, coded by its declaration: `one_of` choices by index,
    bools as choices, floats bit for bit, ints (or None / "adaptive") as ints. A field added to the
    dataclass is agreed without being listed anywhere else."""
    out = []
    for f in dataclasses.fields(config):
        value, declared = getattr(config, f.name), str(f.type)
        if "choices" in f.metadata:
            out.append(choice_field(f.name, value, f.metadata["choices"]))
        elif declared == "bool":
            out.append(choice_field(f.name, value, (False, True)))
        elif "float" in declared:
            out.append(float_field(f.name, value))
        elif "int" in declared:
            out.append(int_field(f.name, value, unset="'adaptive'" if "str" in declared else "None"))
        else:
            raise TypeError(f"config field {f.name}: no agreement code for type {declared}")
    return out


def _bits_to_float(code: int) -> float:
    return struct.unpack("<d", struct.pack("<q", code))[0]


def _differences(fields: Sequence[Field], table_WK: list[list[int]]) -> list[str]:
    out = []
    for k, field in enumerate(fields):
        column = [row[k] for row in table_WK]
        if len(set(column)) > 1:
            values = ", ".join(f"rank {r}: {field.show(c)}" for r, c in enumerate(column))
            out.append(f"{field.name} ({values})")
    return out


def agree_fields(
    fields: Sequence[Field],
    maxima: Sequence[int] = (),
    group=None,
    *,
    device: torch.device | str | None = None,
    what: str = "",
    finished: FinishedWork | None = None,
) -> list[int]:
    """Check that every rank of `group` holds equal `fields`, and return the group maximum of each of
    `maxima`: one all-reduce (MAX) of 2K + X int64 values, whatever the group's size. Every caller on
    every rank must pass the same number of fields and maxima (a fixed layout, never a data-dependent
    one).

    Raises ValueError on every rank naming each differing field and every rank's value. `group=None`
    means WORLD when torch.distributed is initialised; a single process returns `maxima` unchanged.
    `finished`: where the finished collectives are kept (see flexmoe.parallel.comm.FinishedWork).
    """
    maxima = [int(v) for v in maxima]
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return maxima
    if dist.get_world_size(group) == 1:
        return maxima
    # A field agrees when its maximum over the ranks equals its minimum, and min(c) = ~max(~c) (bitwise
    # NOT: unlike negation it cannot overflow int64). NCCL runs a small all-reduce on a tree (latency
    # growing with log W) where an all-gather takes a ring's W - 1 steps, and what each rank reads back
    # stays 2K + X numbers at thousands of ranks.
    codes = [f.code for f in fields]
    local = torch.tensor(codes + [~c for c in codes] + maxima, dtype=torch.int64)
    reduced = local.to(control_device(group, device))
    all_reduce_max(reduced, group, finished=finished)
    out, K = reduced.tolist(), len(codes)
    if any(out[k] != ~out[K + k] for k in range(K)):  # every rank sees it: all of them gather below
        raise ValueError(_disagreement(fields, codes, group, reduced.device, what, finished))
    return out[2 * K :]


def _disagreement(
    fields: Sequence[Field],
    codes: list[int],
    group,
    device: torch.device,
    what: str,
    finished: FinishedWork | None,
) -> str:
    """The error message: each differing field with every rank's value (one all-gather, on the
    failing path only)."""
    world = dist.get_world_size(group)
    table_WK = torch.empty(world * len(codes), dtype=torch.int64, device=device)
    all_gather_flat(table_WK, torch.tensor(codes, dtype=torch.int64, device=device), group, finished=finished)
    diffs = _differences(fields, table_WK.view(world, -1).tolist())
    prefix = f"{what}: " if what else ""
    return f"{prefix}ranks disagree on " + "; ".join(diffs)
