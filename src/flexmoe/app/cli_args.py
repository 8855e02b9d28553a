"""Command-line arguments that fail as one line naming the option (exit code 2), never a traceback.

Every `flexmoe` sub-command builds its parser from `ArgumentParser` and checks values with the
`type=` validators below, so a bad value is refused while parsing, as "flexmoe plan: error: argument
--tokens: must be a positive integer, got '0'". Errors found later (a missing checkpoint, a damaged
file, a setting the model refuses) are ValueError/OSError subclasses that `flexmoe.cli.main` prints
as one line too; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Callable

# Exceptions that report a user's mistake (bad value, missing or damaged file), not a bug.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def one_line(message: object) -> str:
    return " ".join(str(message).split())


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its error as ONE line on stderr (no usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def _number(kind: type, text: str):
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def _checked(kind: type, accept: Callable[[float], bool], what: str) -> Callable[[str], object]:
    def parse(text: str):
        value = _number(kind, text)
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
nonnegative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
finite_float = _checked(float, math.isfinite, "a finite number")
positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a number > 0")
nonnegative_float = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
open_fraction = _checked(float, lambda v: 0 < v < 1, "a number in (0, 1)")
unit_interval = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
half_open_fraction = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def positive_int_list(text: str) -> list[int]:
    """ "16,64,256" -> [16, 64, 256]."""
    items = [item.strip() for item in text.split(",")]
    try:
        values = [int(item) for item in items]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text!r}")
    return values


def run(prog: str, fn: Callable[[], object], *, debug: bool) -> object:
    """Run a command; a user error becomes one line on stderr and exit code 2 (unless `debug`)."""
    if debug:
        return fn()
    try:
        return fn()
    except USER_ERRORS as err:
        print(f"{prog}: error: {one_line(err)} (--debug shows the traceback)", file=sys.stderr, flush=True)
        _leave_process_group()
        raise SystemExit(2) from None


def _leave_process_group() -> None:
    """A gloo group still alive in the interpreter's teardown can abort the process at exit
    ("terminate called without an active exception"), turning exit code 2 into a crash."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def without_option(argv: list[str], option: str) -> list[str]:
    """`argv` less `option` and its value ("--nproc 2" or "--nproc=2"): what a launcher passes on to
    the processes it starts. Exact names only, so its parser must have allow_abbrev=False."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == option:
            skip = True
        elif not item.startswith(option + "="):
            out.append(item)
    return out


def add_cpu_allocator_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cpu-allocator",
        choices=("retain", "default"),
        default="retain",
        help="retain (default): keep freed host memory for reuse, as CUDA's caching allocator does; "
        "default: the C library's behaviour (see flexmoe.cpu_memory)",
    )


def apply_cpu_allocator(choice: str) -> str:
    """Applies --cpu-allocator; returns the allocator in effect, for the environment record."""
    from flexmoe.cpu_memory import retain_freed_memory

    return "retain" if choice == "retain" and retain_freed_memory() else "default"


def parse_overrides(items: list[str]) -> dict:
    """`--set FIELD=JSON` items as {field: value}; a value that is not JSON stays the string given."""
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides
