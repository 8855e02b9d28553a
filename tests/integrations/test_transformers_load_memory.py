"""Loading a transformers checkpoint into a model sharded over 2 fresh gloo ranks: each rank's resident
set should grow by about half the checkpoint's expert bytes plus the dense part, as
flexmoe.integrations.transformers.load_expert_parallel reads only the rank's own experts (and FSDP2
rows) from the files, straight into the tensors the model keeps. Measured with the kernel's
high-water mark (flexmoe.bench.host_memory), after the model's modules are imported (a one-time cost
of a process, ~50 MiB here, the same whatever loads); the figures are printed (pytest -s).

192 MiB of experts, 0.3 MiB of the rest, peak growth per rank (the budget: 96 + 0.3 + 48 MiB):
- transformers' EP ("all_to_all"): 105 MiB; transformers' own reading of the files (from_pretrained
  with the path) peaked at 236 MiB: it reads a rank's experts in a thread pool all at once, then
  stacks and concatenates them, so that it holds them two to three times over;
- flexmoe's EP ("flexmoe"): 106 MiB (~240 MiB while its MoELayers drew experts of their own that the
  module's parameters then replaced: they now take the module's, MoELayer(build_experts=...));
- the whole model on every rank, then shard_experts: ~2.6x the expert bytes (490-505 MiB; 720-780
  MiB while its MoELayers also drew experts of their own).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from flexmoe.bench import host_memory  # noqa: E402
from flexmoe.testing.distributed import DistributedPool  # noqa: E402
from flexmoe.testing.hf_tiny import tiny_model  # noqa: E402

pytestmark = pytest.mark.skipif(not host_memory.available(), reason="needs Linux's /proc")

W = 2
# 64 experts of 256 x 512 in 2 layers: 192 MiB of experts in float32, 0.3 MiB of the rest
BIG_EXPERTS = dict(hidden_size=256, moe_intermediate_size=512, num_experts=64, num_experts_per_tok=2)
MiB = 2**20


def load_worker(path: str, how: str) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    import flexmoe.integrations.transformers as fx

    with torch.device("meta"):  # the model's modules imported before the measurement
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    with host_memory.peak_growth() as grown:
        if how == "shard_experts":  # flexmoe's own path: the whole model on every rank, then sharded
            model = fx.shard_experts(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
        else:
            model = fx.load_expert_parallel(
                path, ep_implementation=how, dtype=torch.float32, experts_implementation="eager"
            )
    local_experts = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
        for name, p in model.named_parameters()
        if ".experts." in name
    )
    return {**grown, "local_expert_bytes": local_experts}


@pytest.fixture(scope="module")
def pool():
    with DistributedPool(W, collective_timeout_s=60.0, timeout_s=240.0) as p:
        yield p


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[str, int, int]:
    """(path, expert bytes, dense bytes) of the saved model."""
    path = tmp_path_factory.mktemp("big")
    model = tiny_model("qwen3_moe", dtype=torch.float32, **BIG_EXPERTS)
    nbytes = {name: p.numel() * p.element_size() for name, p in model.named_parameters()}
    experts = sum(n for name, n in nbytes.items() if ".experts." in name)
    model.save_pretrained(path)
    return str(path), experts, sum(nbytes.values()) - experts


def _in_fresh_processes(pool, *args) -> list[dict]:
    pool.close()  # nothing freed earlier in them that a load could reuse unseen
    return pool.run(load_worker, *args)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ep", ["all_to_all", "flexmoe"])
def test_load_expert_parallel_reads_only_this_ranks_experts(pool, checkpoint, ep):
    path, experts, dense = checkpoint
    got = _in_fresh_processes(pool, path, ep)
    for rank in range(W):
        print(
            f"rank {rank}: checkpoint experts {experts / MiB:.0f} MiB, dense {dense / MiB:.1f} MiB; peak "
            f"growth while loading under ep_implementation={ep!r}: {got[rank]['peak_bytes'] / MiB:.0f} MiB"
        )
    for rank in range(W):
        assert got[rank]["local_expert_bytes"] == experts // W
        # this rank's experts, the dense part and the loader's own working memory, far from every expert
        assert got[rank]["peak_bytes"] < experts // W + dense + experts // 4
        assert got[rank]["peak_bytes"] > experts // W * 0.9  # the measurement sees what was loaded


@pytest.mark.timeout(300)
def test_the_whole_model_then_shard_experts_passes_every_expert_through(pool, checkpoint):
    path, experts, _ = checkpoint
    got = _in_fresh_processes(pool, path, "shard_experts")
    for rank in range(W):
        print(
            f"rank {rank}: peak growth, whole model + shard_experts: {got[rank]['peak_bytes'] / MiB:.0f} MiB"
        )
        assert got[rank]["local_expert_bytes"] == experts // W
        assert got[rank]["peak_bytes"] > experts * 0.9
