"""The few object collectives a save or load needs, and agreement on failure: when one rank fails,
every rank raises (a lone failure would leave the others waiting in the next collective)."""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist

_ERROR_TYPES = {cls.__name__: cls for cls in (ValueError, FileNotFoundError, FileExistsError, KeyError)}


class Comm:
    """Rank, world size and object collectives over one group; no-ops on a single process."""

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


def fail_together(comm: Comm, error: BaseException | None) -> None:
    """Every rank learns whether any rank failed, and all of them raise (a lone failure would leave the
    other ranks waiting in the next collective). The failing rank raises its own exception."""
    reports = comm.all_gather(_report(error))
    if error is not None:
        raise error
    _raise_reported(reports)


def gather(comm: Comm, error: BaseException | None, value) -> list:
    """`fail_together`, and every rank's `value` (in rank order) when no rank failed."""
    reports = comm.all_gather((_report(error), value))
    if error is not None:
        raise error
    _raise_reported([report for report, _ in reports])
    return [value for _, value in reports]


def on_first_rank(comm: Comm, fn: Callable[[], object]):
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
