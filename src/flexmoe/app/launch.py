"""Process-group setup for the app commands (`flexmoe train`, `eval`, `predict`, `tune`, `lm`).

This is the one place that starts the process group: every command calls `init_distributed()` first
and gets back its rank, the world size and the device it should run on, whether it was started by
torchrun or as a single plain process.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group torchrun set up (if any); gloo on CPU, NCCL on CUDA.

    Returns (rank, world size, device); a plain process (no torchrun) is rank 0 of a world of 1 and
    starts no process group.
    """
    if not dist.is_initialized() and dist.is_torchelastic_launched():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=5))
    if not dist.is_initialized():
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = rank % torch.cuda.device_count()
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")
