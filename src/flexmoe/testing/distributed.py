"""A pool of W gloo ranks on loopback, started once and reused by many test cases.

Starting a rank costs seconds (each process imports torch), so a test module starts its W workers
once (a `scope="module"` fixture) and sends them module-level functions to run:

    with DistributedPool(4) as pool:
        results = pool.run(fn, *args)     # [fn(*args) on rank 0, on rank 1, ...], tensors on CPU

Functions travel by reference (module and name), so they must be importable in a fresh process;
test modules are, because pytest puts their directory on sys.path and "spawn" children inherit it.

Nothing hangs forever: every collective has the process group's timeout (`collective_timeout_s`) and
every `run` has `timeout_s`. After a failure or a timeout the workers are killed (a gloo group that
failed is not reusable) and the next `run` starts fresh ones.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import pickle
import socket
import sys
import time
import traceback
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

__all__ = ["DistributedPool", "DistributedPoolError", "free_port"]

# How often an idle worker checks that its parent is still alive.
_PARENT_POLL_S = 1.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it for a socket bound to 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DistributedPoolError(RuntimeError):
    """A function raised on some ranks; the message holds every failing rank's traceback."""


def _to_cpu(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _send(conn: Connection, message: Any) -> None:
    # Plain pickle, not multiprocessing's: tensors travel as bytes instead of shared-memory handles
    # that would outlive a killed worker.
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _receive(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def _worker(rank: int, world_size: int, port: int, collective_timeout_s: float, conn: Connection) -> None:
    """One rank: join the gloo group, then run functions until told to stop or orphaned."""
    parent = os.getppid()
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=collective_timeout_s),
        )
    except BaseException:
        _send(conn, ("error", traceback.format_exc()))
        return
    _send(conn, ("ready", None))
    code = 0
    try:
        _serve(conn, parent)
    except BaseException:  # e.g. the pipe broke; leave a trace in the worker's stderr
        traceback.print_exc()
        code = 1
    # tearing down after a failed collective may fail too; the process exits anyway
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    # Skip the interpreter's shutdown (about a second per worker with torch loaded, on every close);
    # every result was sent already.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _serve(conn: Connection, parent: int) -> None:
    """Run tasks until told to stop (None), the pipe closes, or the parent is gone."""
    while True:
        if not conn.poll(_PARENT_POLL_S):
            if os.getppid() != parent:  # the parent died without closing the pipe: do not linger
                return
            continue
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):  # the parent closed its end
            return
        try:
            # unpickling imports fn's module, which can fail too: report it like fn's own errors
            task = pickle.loads(data)
            if task is None:
                return
            fn, args, kwargs = task
            reply = ("ok", _to_cpu(fn(*args, **kwargs)))
            payload = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException:
            payload = pickle.dumps(("error", traceback.format_exc()))
        conn.send_bytes(payload)


def _stop(processes: list, conns: list[Connection], graceful: bool) -> None:
    """Ask the workers to exit (graceful), then terminate and kill whatever remains, and reap all."""
    if graceful:
        for conn in conns:
            with contextlib.suppress(OSError):
                _send(conn, None)
        deadline = time.monotonic() + 5.0
        for p in processes:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=2.0)
        if p.is_alive():
            p.kill()
            p.join(timeout=2.0)
    for conn in conns:
        conn.close()
    for p in processes:
        if not p.is_alive():
            p.close()


class DistributedPool:
    """W worker processes forming one gloo group; `run(fn, ...)` calls fn on every rank.

    Workers start lazily on the first `run` and again after any failure; `close()` (or leaving the
    `with` block) stops them. Each worker uses one thread, so W ranks fit on few cores.
    """

    def __init__(self, world_size: int, *, collective_timeout_s: float = 30.0, timeout_s: float = 120.0):
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        if not collective_timeout_s > 0:
            raise ValueError(f"collective_timeout_s must be > 0, got {collective_timeout_s}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.world_size = world_size
        self.collective_timeout_s = float(collective_timeout_s)
        self.timeout_s = float(timeout_s)
        self._context = mp.get_context("spawn")
        self._processes: list = []
        self._conns: list[Connection] = []
        # Reap the workers even if the owner forgets to close the pool.
        self._finalizer: weakref.finalize | None = None

    def __enter__(self) -> DistributedPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return bool(self._processes)

    # -- lifecycle ---------------------------------------------------------------------------------
    def _start(self) -> None:
        for attempt in range(2):
            failed = self._try_start()
            if not failed:
                return
            # free_port's port can be taken by someone else before rank 0 listens on it: retry once
            port_taken = any(
                "EADDRINUSE" in text or "address already in use" in text.lower() for text in failed.values()
            )
            if not port_taken or attempt == 1:
                raise DistributedPoolError(self._describe("starting the pool", failed))

    def _try_start(self) -> dict[int, str]:
        """Start the workers; {rank: error text} of those that could not join the group."""
        port = free_port()
        self._processes, self._conns = processes, conns = [], []
        self._finalizer = weakref.finalize(self, _stop, processes, conns, False)
        try:
            for rank in range(self.world_size):
                parent_end, child_end = self._context.Pipe(duplex=True)
                p = self._context.Process(
                    target=_worker,
                    args=(rank, self.world_size, port, self.collective_timeout_s, child_end),
                    name=f"flexmoe-rank{rank}",
                    daemon=True,  # multiprocessing kills daemons when the parent exits normally
                )
                conns.append(parent_end)
                p.start()
                processes.append(p)
                child_end.close()  # so the worker sees EOF when our end closes
            replies = self._collect("starting the pool", self.timeout_s)
        except BaseException:
            self._teardown()
            raise
        failed = {rank: text for rank, (kind, text) in replies.items() if kind != "ready"}
        if failed:
            self._teardown()
        return failed

    def _teardown(self, graceful: bool = False) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        processes, conns = self._processes, self._conns
        self._processes, self._conns = [], []
        _stop(processes, conns, graceful)

    def close(self) -> None:
        """Stop the workers (politely, then by force) and reap them. The pool can start again."""
        self._teardown(graceful=True)

    # -- running -----------------------------------------------------------------------------------
    def _collect(self, what: str, timeout_s: float) -> dict[int, tuple[str, Any]]:
        """One reply per rank; a worker that exits without replying counts as failed."""
        replies: dict[int, tuple[str, Any]] = {}
        pending = {conn: rank for rank, conn in enumerate(self._conns)}
        sentinels = {p.sentinel: rank for rank, p in enumerate(self._processes)}
        deadline = time.monotonic() + timeout_s
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._teardown()
                raise TimeoutError(
                    f"{what}: ranks {sorted(pending.values())} did not answer within {timeout_s:g} s "
                    f"(answered: {sorted(replies)}); the pool was stopped and restarts on the next run"
                )
            waiting = [*pending, *(s for s, rank in sentinels.items() if rank not in replies)]
            for ready in wait(waiting, timeout=remaining):
                if isinstance(ready, Connection):
                    rank = pending[ready]
                    try:
                        replies[rank] = _receive(ready)
                    except (EOFError, OSError):
                        self._processes[rank].join(timeout=1.0)
                        code = self._processes[rank].exitcode
                        replies[rank] = ("error", f"the worker exited (code {code}) without answering")
                    except Exception:  # a result this process cannot unpickle
                        replies[rank] = ("error", traceback.format_exc())
                    del pending[ready]
            # A sentinel fires when a worker exits; read whatever it sent before checking it off.
            for conn, rank in list(pending.items()):
                p = self._processes[rank]
                if not p.is_alive() and not conn.poll():
                    replies[rank] = ("error", f"the worker process exited with code {p.exitcode}")
                    del pending[conn]
        return replies

    @staticmethod
    def _describe(what: str, failed: dict[int, str]) -> str:
        text = "\n".join(f"--- rank {rank} ---\n{tb.rstrip()}" for rank, tb in sorted(failed.items()))
        return f"{what} failed on ranks {sorted(failed)}:\n{text}"

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """fn(*args, **kwargs) on every rank -> the results in rank order (tensors on CPU).

        Raises DistributedPoolError with every failing rank's traceback if any rank raised (ranks
        left waiting in a collective fail within `collective_timeout_s`), and TimeoutError if ranks
        do not answer within `timeout_s`; either way the pool is stopped and restarts on the next run.
        """
        try:
            task = pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as err:
            raise ValueError(
                f"DistributedPool.run needs a picklable module-level function and arguments: {err}"
            ) from err
        if not self._processes:
            self._start()
        name = getattr(fn, "__qualname__", repr(fn))
        try:
            for conn in self._conns:
                conn.send_bytes(task)
            replies = self._collect(name, self.timeout_s)
        except BaseException:
            # e.g. Ctrl-C: replies may still be on their way, so these workers cannot be reused
            self._teardown()
            raise
        failed = {rank: text for rank, (kind, text) in replies.items() if kind != "ok"}
        if failed:
            self._teardown()
            raise DistributedPoolError(self._describe(name, failed))
        return [replies[rank][1] for rank in range(self.world_size)]
