"""Bytes of the Python standard library's own source files: a corpus present on every machine.

Files are split, not bytes: every `holdout_every`-th file (in sorted order) is held out, so the
held-out loss measures text the model never saw. Windows are drawn with explicit generators, so
every rank can draw its own batch and all ranks the same held-out windows.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB = 256  # bytes


def stdlib_files() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


@dataclass(frozen=True)
class ByteCorpus:
    train: torch.Tensor  # uint8 [N_train]
    held_out: torch.Tensor  # uint8 [N_held_out]

    @classmethod
    def from_stdlib(cls, *, holdout_every: int = 10, max_bytes: int | None = None) -> ByteCorpus:
        files = stdlib_files()
        if len(files) < 2:
            raise ValueError(f"found {len(files)} .py files in the standard library; need at least 2")
        train, held = [], []
        for i, f in enumerate(files):
            (held if i % holdout_every == holdout_every - 1 else train).append(f.read_bytes())
        train_bytes, held_bytes = b"\n".join(train), b"\n".join(held)
        if max_bytes is not None:
            train_bytes, held_bytes = train_bytes[:max_bytes], held_bytes[: max(1, max_bytes // 10)]
        as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
        return cls(as_tensor(train_bytes), as_tensor(held_bytes))

    def windows(self, split: str, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """[count, length] token ids (long) from random offsets of a split."""
        data = self.train if split == "train" else self.held_out
        if data.numel() <= length:
            raise ValueError(f"the {split} split has {data.numel()} bytes; a window needs more than {length}")
        starts = torch.randint(0, data.numel() - length, (count,), generator=generator)
        return torch.stack([data[s : s + length] for s in starts.tolist()]).long()

    def unigram_loss(self) -> float:
        """Cross-entropy (nats per byte) of the held-out bytes under the training bytes' frequencies
        (add-one smoothing): what a model that ignores context achieves."""
        counts = torch.bincount(self.train.long(), minlength=VOCAB).double() + 1
        log_p = (counts / counts.sum()).log()
        held = torch.bincount(self.held_out.long(), minlength=VOCAB).double()
        return float(-(held * log_p).sum() / held.sum())

    def summary(self) -> dict:
        return {
            "train_bytes": self.train.numel(),
            "held_out_bytes": self.held_out.numel(),
            "unigram_nats_per_byte": self.unigram_loss(),
            "unigram_bits_per_byte": self.unigram_loss() / math.log(2),
        }
