"""A pool of W gloo worker processes on loopback, started once and reused by many test cases.

Starting a process costs seconds (each imports torch), so tests start W workers once per module and
send them module-level functions to run. Every collective has the process group's timeout, so a
bug fails fast; a failed or timed-out run tears the pool down, and the next run starts a fresh one.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    world_size: int,
    port: int,
    collective_timeout_s: float,
    parent_pid: int,
    tasks: mp.Queue,
    results: mp.Queue,
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=collective_timeout_s),
        )
    except Exception:
        results.put((rank, False, traceback.format_exc()))
        return
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent_pid:  # the parent died: do not linger
                return
            continue
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, _to_cpu(fn(*args, **kwargs))))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


def _to_cpu(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


class DistributedPoolError(RuntimeError):
    pass


class DistributedPool:
    """`with DistributedPool(4) as pool: pool.run(fn, *args)` -> [fn's result on rank 0, 1, ...]."""

    def __init__(self, world_size: int, *, collective_timeout_s: float = 30.0, timeout_s: float = 120.0):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.collective_timeout_s = collective_timeout_s
        self.timeout_s = timeout_s
        self._context = mp.get_context("spawn")
        self._processes: list = []

    def __enter__(self) -> DistributedPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        port = free_port()
        self._tasks = [self._context.Queue() for _ in range(self.world_size)]
        self._results = self._context.Queue()
        self._processes = [
            self._context.Process(
                target=_worker,
                args=(
                    rank,
                    self.world_size,
                    port,
                    self.collective_timeout_s,
                    os.getpid(),
                    self._tasks[rank],
                    self._results,
                ),
                daemon=True,
            )
            for rank in range(self.world_size)
        ]
        for p in self._processes:
            p.start()

    def run(self, fn: Callable, *args, **kwargs) -> list:
        if not self._processes:
            self._start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        outcomes: dict[int, tuple[bool, object]] = {}
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=self.timeout_s)
        while len(outcomes) < self.world_size:
            remaining = (deadline - datetime.datetime.now()).total_seconds()
            try:
                rank, ok, value = self._results.get(timeout=max(0.1, min(remaining, 1.0)))
                outcomes[rank] = (ok, value)
            except queue.Empty:
                dead = [i for i, p in enumerate(self._processes) if not p.is_alive() and i not in outcomes]
                if dead or remaining <= 0:
                    self.close()
                    why = f"ranks {dead} died" if dead else f"no answer within {self.timeout_s}s"
                    raise TimeoutError(f"{fn.__name__}: {why}; answered: {sorted(outcomes)}") from None
        failures = {rank: value for rank, (ok, value) in sorted(outcomes.items()) if not ok}
        if failures:
            self.close()  # a group that failed or timed out is not reusable
            text = "\n".join(f"--- rank {rank} ---\n{tb}" for rank, tb in failures.items())
            raise DistributedPoolError(f"{fn.__name__} failed on ranks {sorted(failures)}:\n{text}")
        return [outcomes[rank][1] for rank in range(self.world_size)]

    def close(self) -> None:
        for p, q in zip(self._processes, getattr(self, "_tasks", []), strict=False):
            if p.is_alive():
                q.put(None)
        for p in self._processes:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._processes = []
