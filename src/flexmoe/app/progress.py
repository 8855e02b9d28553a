"""Progress of a training loop: tqdm's bar on a terminal, plain lines in pipes and log files.

tqdm redraws one line with carriage returns; a pipe or a log file keeps every redraw, so a run's log
becomes one line thousands of characters long. Where the stream is not a terminal, a plain line is
printed every `every_s` seconds instead (and one at the end), which reads the same in any log.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Protocol, TextIO

PLAIN_EVERY_S = 10.0  # seconds between two plain progress lines


class Progress(Protocol):
    def update(self, n: int = 1) -> object: ...
    def set_postfix(self, **values: object) -> object: ...
    def close(self) -> object: ...


class NoProgress:
    """Shows nothing (ranks other than the first, or progress turned off)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: object) -> None:
        pass

    def close(self) -> None:
        pass


class PlainProgress:
    """One line `desc: done/total steps, elapsed s, key=value ...` every `every_s` seconds and at close."""

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        stream: TextIO,
        every_s: float = PLAIN_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.desc, self.stream = total, desc, stream
        self.every_s, self.clock = every_s, clock
        self.done = 0
        self.postfix: dict[str, object] = {}
        self.started = self.last_line = clock()
        self.printed_at = -1  # `done` when the last line was printed

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.clock() - self.last_line >= self.every_s:
            self._line()

    def set_postfix(self, **values: object) -> None:
        self.postfix = values

    def close(self) -> None:
        if self.done != self.printed_at:  # the final state, unless the last line already shows it
            self._line()

    def _line(self) -> None:
        now = self.clock()
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        print(
            f"{self.desc}: {self.done}/{self.total} steps, {now - self.started:.0f} s{extra}",
            file=self.stream,
            flush=True,
        )
        self.last_line, self.printed_at = now, self.done


def start_progress(
    total: int, desc: str, *, enabled: bool, leave: bool = True, stream: TextIO | None = None
) -> Progress:
    """tqdm on a terminal, `PlainProgress` elsewhere (on stderr by default, as tqdm), nothing if not
    `enabled`."""
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return NoProgress()
    if not _is_terminal(stream):
        return PlainProgress(total, desc, stream=stream)
    try:
        from tqdm import tqdm  # the demo extra; only needed on a terminal
    except ImportError:
        return PlainProgress(total, desc, stream=stream)
    return tqdm(total=total, desc=desc, file=stream, leave=leave, dynamic_ncols=True)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
