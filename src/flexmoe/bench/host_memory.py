"""Peak host memory of one phase of a process (Linux): how far its resident set grew above its size at
the start of the phase, from the kernel's high-water mark (VmHWM), which writing "5" to
/proc/self/clear_refs resets to the current size. Pages of memory-mapped files count once touched,
so a loader that maps a whole checkpoint but reads only some tensors is charged only for those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise RuntimeError(f"{_STATUS} has no {field}")


def available() -> bool:
    return _STATUS.exists() and _CLEAR_REFS.exists()


@contextlib.contextmanager
def peak_growth() -> Iterator[dict]:
    """Yields a dict that gets "peak_bytes" (the largest growth of the resident set during the block)
    and "end_bytes" (its growth at the end). Raises RuntimeError where /proc cannot tell."""
    if not available():
        raise RuntimeError("peak host memory needs Linux's /proc/self/status and /proc/self/clear_refs")
    _CLEAR_REFS.write_text("5")  # the high-water mark restarts from the current resident set
    start = _status_bytes("VmRSS")
    out: dict = {}
    yield out
    out["peak_bytes"] = _status_bytes("VmHWM") - start
    out["end_bytes"] = _status_bytes("VmRSS") - start
