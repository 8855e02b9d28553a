"""The tensors of a local safetensors checkpoint, read row range by row range into tensors the
caller owns.

A safetensors file is an 8-byte little-endian header size, a JSON header (name -> dtype, shape,
byte range in the data that follows) and the raw C-order data. Rows [a, b) of a stored tensor are one
contiguous byte range, so they are read with plain file reads straight into the destination: no
memory map (whose touched pages a process is charged for until it unmaps the file) and no buffer
between the file and the tensor. Each read opens the file itself, so reads from several threads
(transformers' loader runs them in a pool) share no file position.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_HEADER_LIMIT = 100 * 2**20  # the format caps its header at 100 MB; a larger size means a corrupt file


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a checkpoint file: where its data starts, its dtype and shape."""

    name: str
    file: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    def read_rows(self, start: int, stop: int, out: torch.Tensor) -> None:
        """Rows [start, stop) of dim 0 (the whole tensor for a 0-dim one) into `out`, a contiguous
        CPU tensor of this dtype and of those rows' shape."""
        rows = (stop - start,) + self.shape[1:] if self.shape else ()
        if not (0 <= start <= stop <= (self.shape[0] if self.shape else 1)):
            raise ValueError(f"rows [{start}, {stop}) of {self.name} {list(self.shape)}")
        assert out.dtype == self.dtype and tuple(out.shape) == rows and out.is_contiguous()
        assert out.device.type == "cpu"
        if out.numel() == 0:
            return
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        first = self.offset + start * self.row_bytes if self.shape else self.offset
        with open(self.file, "rb", buffering=0) as f:
            f.seek(first)
            while len(buffer):
                n = f.readinto(buffer)
                if not n:
                    raise ValueError(f"{self.file} ends inside {self.name}: truncated checkpoint")
                buffer = buffer[n:]


def _file_tensors(file: Path) -> dict[str, StoredTensor]:
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= _HEADER_LIMIT:
            raise ValueError(f"{file} is not a safetensors file (header size {size})")
        header = json.loads(f.read(size))
    data_start = 8 + size
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{file}: {name} has dtype {entry['dtype']}, which this reader does not know")
        dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{file}: {name} holds {end - begin} bytes, not those of {dtype} {list(shape)}")
        out[name] = StoredTensor(name, file, data_start + begin, dtype, shape)
    return out


def checkpoint_dir(path: str | Path) -> Path:
    """`path` as a local directory, or ValueError."""
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(
            f"path must be a local directory holding a safetensors checkpoint, got {str(path)!r} "
            "(for a Hub model, download it first, e.g. huggingface_hub.snapshot_download)"
        )
    return directory


def checkpoint_tensors(path: str | Path) -> dict[str, StoredTensor]:
    """Every tensor of the safetensors checkpoint in the local directory `path` (sharded, through
    its index, or one model.safetensors); nothing but the headers is read."""
    directory = checkpoint_dir(path)
    if (directory / INDEX_NAME).exists():
        weight_map = json.loads((directory / INDEX_NAME).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (directory / SINGLE_NAME).exists():
        files = [SINGLE_NAME]
    else:
        raise ValueError(f"path {str(path)!r} holds neither {INDEX_NAME} nor {SINGLE_NAME}")
    tensors: dict[str, StoredTensor] = {}
    for name in files:
        tensors.update(_file_tensors(directory / name))
    return tensors


__all__ = ["DTYPES", "StoredTensor", "checkpoint_dir", "checkpoint_tensors"]
