"""Every ```python block of README.md runs as written, so the README cannot drift from the code.

Each block runs on its own (a fresh namespace) in a scratch folder. A marker comment on the line
before a block says where, when not on this process:

    <!-- readme-test: torchrun 2 -->     on each rank of a 2-rank gloo pool, standing for torchrun:
                                         the block's `dist.init_process_group(...)` joins the pool's group
    <!-- readme-test: skip (REASON) -->  not run (rare, each with its reason)
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

from flexmoe.testing.distributed import DistributedPool

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*(?P<how>.*?)\s*-->")
HOW = re.compile(r"torchrun 2|skip \(.+\)")


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    code: str
    how: str  # "here", "torchrun 2" or "skip (reason)"

    @property
    def name(self) -> str:
        return f"README.md:{self.line}"


def readme_blocks(text: str) -> list[Block]:
    """The ```python blocks of `text`, each with the marker on the nearest non-empty line above it."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() != "```python":
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.search(above)
        how = marker.group("how") if marker else "here"
        blocks.append(Block(line=i + 1, code="\n".join(lines[i + 1 : end]) + "\n", how=how))
        i = end + 1
    return blocks


BLOCKS = tuple(readme_blocks(README.read_text()))


def _already_joined(*args: object, **kwargs: object) -> None:
    """init_process_group inside the pool: the rank is in the group torchrun would have started."""
    import torch.distributed as dist

    assert dist.is_initialized()


def run_block(code: str, name: str, folder: str) -> bool:
    """Run one block in `folder`; on a pool rank `dist.init_process_group` joins the pool's group."""
    import torch.distributed as dist

    joined = (
        mock.patch.object(dist, "init_process_group", _already_joined)
        if dist.is_initialized()
        else contextlib.nullcontext()
    )
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with joined:
            exec(compile(code, name, "exec"), {"__name__": "__readme__"})
    finally:
        os.chdir(cwd)
    return True


@pytest.fixture(scope="module")
def pool2():
    with DistributedPool(2, collective_timeout_s=30.0, timeout_s=120.0) as pool:
        yield pool


def test_the_readme_has_python_blocks_with_known_markers():
    assert len(BLOCKS) >= 5
    assert [b.name for b in BLOCKS if b.how != "here" and not HOW.fullmatch(b.how)] == []
    skipped = [b.name for b in BLOCKS if b.how.startswith("skip")]
    assert len(skipped) <= 1, f"skips are for what cannot run here, rarely: {skipped}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.how == "here"], ids=lambda b: b.name)
def test_a_one_process_block_runs(block, tmp_path):
    assert run_block(block.code, block.name, str(tmp_path))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.how == "torchrun 2"], ids=lambda b: b.name)
def test_a_torchrun_block_runs_on_two_ranks(block, pool2, tmp_path):
    if "from transformers import" in block.code:
        pytest.importorskip("transformers")  # the optional extra flexmoe[transformers]
    assert pool2.run(run_block, block.code, block.name, str(tmp_path)) == [True, True]


def test_the_extraction_reads_markers_and_fences():
    lines = ["x", "```python", "a = 1", "```", "<!-- readme-test: torchrun 2 -->", "", "```python", "b = 2"]
    text = "\n".join([*lines, "```", "```bash", "ls", "```"])
    blocks = readme_blocks(text)
    assert [(b.line, b.code, b.how) for b in blocks] == [(2, "a = 1\n", "here"), (7, "b = 2\n", "torchrun 2")]
