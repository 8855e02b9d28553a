"""Checksums of a checkpoint's files and tensors: written into meta.pt at save, verified at load.

torch.load does not check what it reads: a flipped byte inside a tensor loads as a wrong number
(the loss turns into nan, and nothing says why). So every data file's size and BLAKE2b digest (of
the bytes on disk, read back after the write) go into meta.pt, with a digest of every tensor in it.
A load verifies each file before using it; on a mismatch it names the file and, when the file still
unpickles, every tensor whose digest changed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

_CHUNK = 1 << 20


def file_digest(file: Path) -> dict:
    """{"size", "blake2b"} of the file's bytes."""
    h = hashlib.blake2b(digest_size=16)
    size = 0
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "blake2b": h.hexdigest()}


def tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    h = hashlib.blake2b(digest_size=16)
    h.update(memoryview(data))
    return h.hexdigest()


def tensor_digests(obj, prefix: str = "") -> dict[str, str]:
    """Digest of every tensor in a nested dict/list payload, keyed by its path ("a.b.0.c")."""
    out: dict[str, str] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = tensor_digest(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensor_digests(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            out.update(tensor_digests(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


def record(file: Path, payload) -> dict:
    """What meta.pt keeps about one written file."""
    return {**file_digest(file), "tensors": tensor_digests(payload)}


def _changed_tensors(file: Path, expected: dict[str, str]) -> str:
    """Which tensors differ, when the damaged file still loads (for the error message)."""
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception:
        return "; the file no longer loads"
    found = tensor_digests(obj)
    changed = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
    return f"; changed tensor(s): {changed}" if changed else ""


def verify(root: Path, name: str, expected: dict | None) -> None:
    """Raise ValueError naming the file (and its changed tensors) unless it matches `expected`."""
    if expected is None:
        raise ValueError(f"corrupt flexmoe checkpoint {root}: meta.pt holds no checksum of {name}")
    file = root / name
    got = file_digest(file)
    if got["size"] != expected["size"]:
        problem = f"has {got['size']} bytes, {expected['size']} were written"
    elif got["blake2b"] != expected["blake2b"]:
        problem = "fails its checksum (BLAKE2b of its bytes)"
    else:
        return
    detail = _changed_tensors(file, expected.get("tensors", {}))
    raise ValueError(f"corrupt flexmoe checkpoint {root}: {name} {problem}{detail}")
