"""Progress output: tqdm's bar only on a terminal; in pipes and logs, a plain line every few seconds."""

from __future__ import annotations

import io

from flexmoe.app.progress import NoProgress, PlainProgress, start_progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_come_every_period_and_at_the_end():
    clock, out = Clock(), io.StringIO()
    bar = PlainProgress(10, "epoch 1/2", stream=out, every_s=10.0, clock=clock)
    for step in range(10):
        clock.now = 4.0 * (step + 1)  # 4 s per step: a line at 12 s (step 3), 24 s and 36 s
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}")
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "epoch 1/2: 3/10 steps, 12 s, loss=0.333",
        "epoch 1/2: 6/10 steps, 24 s, loss=0.167",
        "epoch 1/2: 9/10 steps, 36 s, loss=0.111",
        "epoch 1/2: 10/10 steps, 40 s, loss=0.100",
    ]
    assert "\r" not in out.getvalue()


def test_close_adds_no_line_when_the_last_one_shows_the_end():
    clock, out = Clock(), io.StringIO()
    bar = PlainProgress(2, "lm", stream=out, every_s=1.0, clock=clock)
    clock.now = 5.0
    bar.update(2)
    bar.close()
    assert out.getvalue() == "lm: 2/2 steps, 5 s\n"


def test_a_pipe_gets_plain_lines_a_terminal_tqdm_and_a_disabled_one_nothing():
    assert isinstance(start_progress(5, "x", enabled=True, stream=io.StringIO()), PlainProgress)
    assert isinstance(start_progress(5, "x", enabled=False, stream=Terminal()), NoProgress)
    terminal = Terminal()
    bar = start_progress(5, "x", enabled=True, stream=terminal)
    assert type(bar).__name__ == "tqdm"
    bar.update(5)
    bar.close()
    assert "5/5" in terminal.getvalue()
