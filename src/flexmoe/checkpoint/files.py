"""A checkpoint directory on disk: its file names, reading and writing them, and publishing a finished
directory atomically (write to `.<name>.tmp`, move an older checkpoint aside to `.<name>.old` for the
instant between two renames, fsync the parent)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

FORMAT = "flexmoe.checkpoint"
VERSION = 2  # 2: meta.pt holds every data file's checksum (integrity.py); 1 loads without checks
READABLE_VERSIONS = (1, 2)
META_FILE = "meta.pt"
REPLICATED_FILE = "replicated.pt"


def expert_file(rank: int) -> str:
    return f"experts-{rank:05d}.pt"


def write(obj, file: Path) -> None:
    with open(file, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def read(file: Path, *, mmap: bool = False):
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise FileNotFoundError(f"incomplete flexmoe checkpoint: {file} is missing") from None
    except Exception as exc:
        raise ValueError(f"cannot read flexmoe checkpoint file {file}: {exc}") from None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def target_path(path) -> Path:
    target = Path(os.path.abspath(os.fspath(path)))
    if target.name in ("", ".", ".."):
        raise ValueError(f"checkpoint path must name a directory, got {os.fspath(path)!r}")
    return target


def tmp_dir(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp")


def backup_dir(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def is_checkpoint(directory: Path) -> bool:
    return directory.is_dir() and (directory / META_FILE).is_file()


def prepare_tmp(target: Path) -> None:
    """First rank, before anyone writes: a clean temporary directory next to the target."""
    target.parent.mkdir(parents=True, exist_ok=True)
    backup = backup_dir(target)
    if not target.exists() and is_checkpoint(backup):
        os.rename(backup, target)  # a previous save stopped between its two renames
    if target.exists() and not is_checkpoint(target) and not (target.is_dir() and not any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not a flexmoe checkpoint; refusing to replace it")
    tmp = tmp_dir(target)
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a save that failed or was killed
    tmp.mkdir()


def publish(tmp: Path, target: Path) -> None:
    """First rank, after every rank has written: move the finished directory into place."""
    backup = backup_dir(target)
    if backup.exists():
        shutil.rmtree(backup)
    if target.exists():
        os.rename(target, backup)
    os.rename(tmp, target)
    _fsync_dir(target.parent)
    if backup.exists():
        shutil.rmtree(backup)


def resolve(target: Path) -> Path:
    if target.is_dir():
        if not (target / META_FILE).is_file():
            raise FileNotFoundError(f"{target} is not a complete flexmoe checkpoint: {META_FILE} is missing")
        return target
    if target.exists():
        raise ValueError(f"{target} is not a directory; a flexmoe checkpoint is a directory")
    backup = backup_dir(target)
    if is_checkpoint(backup):
        return backup  # a save stopped between moving the old checkpoint aside and the new one in
    raise FileNotFoundError(f"no flexmoe checkpoint at {target}")


def read_meta(root: Path) -> dict:
    meta = read(root / META_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{root / META_FILE} is not flexmoe checkpoint metadata")
    return meta
