"""Checkpoints under faults: damaged files are refused with their name (and the changed tensors), a
save stopped at any point leaves the previous checkpoint loadable and the next save working, and a
rank killed in the middle of a save or a step ends the other rank within the collective timeout.

A save "killed" in this process raises a BaseException subclass at the chosen point: like a kill, it
runs none of save_checkpoint's cleanup (which catches Exception only), so the directory is left as a
killed process would leave it. The two-rank cases kill a real rank (os._exit).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from flexmoe import MoELayer, Plan
from flexmoe.checkpoint import META_FILE, REPLICATED_FILE, expert_file, load_checkpoint, save_checkpoint
from flexmoe.checkpoint import files as checkpoint_files
from flexmoe.testing.distributed import DistributedPool, DistributedPoolError

M, H = 8, 16


class Net(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(M, M)
        self.moe = MoELayer(M, H, 4, capacity_factor=0.0, seed=seed, tuner=False, parallelism=1)
        self.double()

    def forward(self, x):
        x = self.proj(x)
        return x + self.moe(x, plan=Plan(r=1))


def _x(rank: int = 0) -> torch.Tensor:
    return torch.randn(6, M, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))


def _out(net: nn.Module, rank: int = 0) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        return net(_x(rank))


def _flip(file: Path, tensor: torch.Tensor, count: int = 256) -> None:
    """XOR `count` bytes inside the stored data of `tensor` (found by its raw bytes)."""
    data = bytearray(file.read_bytes())
    raw = tensor.detach().contiguous().numpy().tobytes()
    start = data.find(raw)
    assert start >= 0, "tensor bytes not found in the file"
    for i in range(start, start + min(count, len(raw))):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


# -- damaged files ---------------------------------------------------------------------------------
def test_a_damaged_expert_shard_is_refused_naming_the_file_and_tensor(tmp_path):
    net = Net(1)
    save_checkpoint(tmp_path / "ckpt", net)
    _flip(tmp_path / "ckpt" / expert_file(0), net.moe.experts.fc1_weight)
    fresh = Net(2)
    before = _out(fresh)
    with pytest.raises(ValueError, match=r"experts-00000\.pt fails its checksum") as err:
        load_checkpoint(tmp_path / "ckpt", fresh)
    assert "changed tensor(s): ['modules.moe.experts.params.fc1_weight']" in str(err.value)
    assert torch.equal(_out(fresh), before)  # nothing was loaded


def test_a_damaged_replicated_file_is_refused_naming_the_file_and_tensor(tmp_path):
    net = Net(1)
    save_checkpoint(tmp_path / "ckpt", net)
    _flip(tmp_path / "ckpt" / REPLICATED_FILE, net.proj.weight, count=8)
    with pytest.raises(ValueError, match=r"replicated\.pt fails its checksum") as err:
        load_checkpoint(tmp_path / "ckpt", Net(2))
    assert "['params.proj.weight']" in str(err.value)


def test_a_truncated_file_is_refused(tmp_path):
    save_checkpoint(tmp_path / "ckpt", Net(1))
    file = tmp_path / "ckpt" / expert_file(0)
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"experts-00000\.pt has \d+ bytes, \d+ were written"):
        load_checkpoint(tmp_path / "ckpt", Net(2))


def _largest_tensor(payload) -> torch.Tensor:
    """The largest tensor anywhere in a checkpoint file's nested dicts and lists."""
    if isinstance(payload, torch.Tensor):
        return payload
    values = payload.values() if isinstance(payload, dict) else payload
    found = [_largest_tensor(v) for v in values if isinstance(v, torch.Tensor | dict | list | tuple)]
    return max((t for t in found if t is not None), key=torch.Tensor.numel, default=None)


@pytest.mark.timeout(120)
def test_every_file_of_a_two_rank_checkpoint_is_checked(tmp_path, pool2):
    """Damage one file at a time of a checkpoint saved on 2 ranks (each expert shard, the replicated
    file, the metadata): the one-process load reads them all and must refuse each by name. A flipped
    tensor still unpickles, so only the checksums catch it; meta.pt holds the checksums and none of its
    own, so it is damaged by truncation, which its reading must report."""
    saved = tmp_path / "saved"
    pool2.run(save_worker, str(saved), 1, 1)
    names = sorted(os.listdir(saved))
    assert names == [expert_file(0), expert_file(1), META_FILE, REPLICATED_FILE]
    for name in names:
        ckpt = tmp_path / f"damaged-{name}"
        shutil.copytree(saved, ckpt)
        file = ckpt / name
        if name == META_FILE:
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
            problem = "cannot read flexmoe checkpoint file"
        else:
            _flip(file, _largest_tensor(torch.load(file, weights_only=True)))
            problem = "fails its checksum"
        try:
            load_checkpoint(ckpt, Net(2))
        except ValueError as err:
            assert name in str(err) and problem in str(err), (name, str(err))
        else:
            pytest.fail(f"a checkpoint with a damaged {name} was loaded")


def test_an_intact_checkpoint_records_every_data_file(tmp_path):
    save_checkpoint(tmp_path / "ckpt", Net(1))
    meta = torch.load(tmp_path / "ckpt" / META_FILE, weights_only=True)
    assert sorted(meta["checksums"]) == [expert_file(0), REPLICATED_FILE]
    assert meta["checksums"][expert_file(0)]["size"] == (tmp_path / "ckpt" / expert_file(0)).stat().st_size


# -- a save stopped part way -----------------------------------------------------------------------
class Killed(BaseException):
    """Stands for the process being killed: no `except Exception` cleanup runs."""


def _kill_after_write(name: str):
    real = checkpoint_files.write

    def write(obj, file):
        real(obj, file)
        if file.name == name:
            raise Killed(name)

    return write


def _kill_in_publish():
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if Path(dst).name == "ckpt":  # the old one is aside, the new one not yet in place
            raise Killed("between the renames")
        real(src, dst)

    return rename


KILL_POINTS = ["prepare", expert_file(0), REPLICATED_FILE, META_FILE, "publish"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_save_killed_part_way_leaves_the_previous_checkpoint_loadable_and_resumable(
    tmp_path, monkeypatch, point
):
    path = tmp_path / "ckpt"
    old = Net(1)
    save_checkpoint(path, old, step=1)
    if point == "prepare":
        real = checkpoint_files.prepare_tmp

        def prepare(target):
            real(target)
            raise Killed(point)

        monkeypatch.setattr(checkpoint_files, "prepare_tmp", prepare)
    elif point == "publish":
        monkeypatch.setattr(checkpoint_files.os, "rename", _kill_in_publish())
    else:
        monkeypatch.setattr(checkpoint_files, "write", _kill_after_write(point))
    with pytest.raises(Killed):
        save_checkpoint(path, Net(5), step=2)
    monkeypatch.undo()

    restored = Net(3)
    assert load_checkpoint(path, restored)["step"] == 1
    assert torch.equal(_out(restored), _out(old))
    new = Net(4)
    save_checkpoint(path, new, step=3)  # the next save cleans up after the killed one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    again = Net(3)
    assert load_checkpoint(path, again)["step"] == 3
    assert torch.equal(_out(again), _out(new))


# -- a killed rank ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool2():
    # a short collective timeout: the surviving rank waits at most that long
    with DistributedPool(2, collective_timeout_s=5.0, timeout_s=60.0) as pool:
        yield pool


def save_worker(path: str, seed: int, step: int) -> None:
    save_checkpoint(path, Net(seed), step=step)


def killed_save_worker(path: str) -> None:
    net = Net(7)
    if dist.get_rank() == 1:
        real = checkpoint_files.write

        def write(obj, file):
            real(obj, file)
            os._exit(9)  # killed right after writing its shard

        checkpoint_files.write = write
    save_checkpoint(path, net, step=2)


def killed_step_worker() -> None:
    layer = MoELayer(M, H, 4, seed=1)
    x = torch.randn(5, M, requires_grad=True)
    layer(x).sum().backward()
    if dist.get_rank() == 1:
        os._exit(9)
    layer(x).sum().backward()  # rank 0 waits for a partner that is gone


def _survivor_failed_by_itself(err: DistributedPoolError) -> bool:
    """Rank 0 raised (a traceback), rather than being stopped by the pool's own timeout."""
    text = str(err)
    return (
        "--- rank 0 ---" in text and "Traceback" in text.split("--- rank 0 ---")[1].split("--- rank 1 ---")[0]
    )


@pytest.mark.timeout(120)
def test_a_rank_killed_in_a_save_ends_the_other_and_the_previous_checkpoint_survives(tmp_path, pool2):
    path = str(tmp_path / "ckpt")
    pool2.run(save_worker, path, 1, 1)
    with pytest.raises(DistributedPoolError) as err:
        pool2.run(killed_save_worker, path)
    assert _survivor_failed_by_itself(err.value)
    assert "the worker exited (code 9)" in str(err.value) or "exited with code 9" in str(err.value)
    previous = Net(9)  # loads on one process: re-sliced from the two saved shards
    assert load_checkpoint(path, previous)["step"] == 1
    assert torch.equal(_out(previous), _out(Net(1)))
    pool2.run(save_worker, path, 4, 3)  # a fresh pool saves over it
    assert load_checkpoint(path, Net(9))["step"] == 3


@pytest.mark.timeout(120)
def test_a_rank_killed_in_a_step_ends_the_other_within_the_collective_timeout(pool2):
    with pytest.raises(DistributedPoolError) as err:
        pool2.run(killed_step_worker)
    assert _survivor_failed_by_itself(err.value)
