"""A 2-rank job that ends normally with MoE layers still alive exits cleanly.

Layers used to keep their process groups alive past destroy_process_group, and the late destruction
of a gloo group in the interpreter's teardown aborted about one run in six ("terminate called
without an active exception", exit code -6). Layers now hold groups weakly (flexmoe.parallel.comm.WeakGroup).
The abort is timing-dependent, so the job runs several times (with the old behaviour six runs miss it
with probability about 0.84**6 = 0.35); its cause, a layer holding a destroyed group, is checked in
every run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import flexmoe
from flexmoe.testing.distributed import free_port

RUNS = 6

SCRIPT = """
import datetime, sys
import torch, torch.distributed as dist
from flexmoe import MoELayer

rank, port = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=30))
layers = [MoELayer(8, 16, 4, seed=1) for _ in range(2)]  # the tuner too
for _ in range(3):
    x = torch.randn(16, 8, requires_grad=True)
    y = layers[1](layers[0](x))
    (y.square().mean() + layers[0].aux_loss).backward()
dist.destroy_process_group()
# the layers are still alive here, and at interpreter exit; they no longer hold the destroyed group
try:
    layers[0].groups.group
except RuntimeError as err:
    assert "process group was destroyed" in str(err), err
else:
    raise AssertionError("the layer still holds the destroyed process group")
"""


def _run_job(script: Path, env: dict) -> list[tuple[int, str]]:
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        results.append((p.returncode, err))
    return results


@pytest.mark.timeout(600)
def test_a_job_that_exits_with_layers_alive_exits_cleanly_every_time(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    source = str(Path(flexmoe.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]))
    failures = []
    for run in range(RUNS):
        for rank, (code, err) in enumerate(_run_job(script, env)):
            if code != 0 or "terminate called" in err:
                failures.append(f"run {run} rank {rank}: exit code {code}, stderr tail {err[-300:]!r}")
    assert not failures, "\n".join(failures)
