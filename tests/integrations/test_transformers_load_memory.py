"""Loading a transformers checkpoint into a model sharded over 2 fresh gloo ranks: what should hold is
that each rank's resident set grows by about half the checkpoint's expert bytes plus the dense part
(it reads only its own experts). It does not hold today, so the test is an expected failure (strict:
it fails once it passes, so that the marker goes): under DistributedConfig with the flexmoe EP, the
loader is transformers' (5.x), and each rank's peak growth is ~1.6x ALL the expert bytes (it reads
and fuses every expert before keeping its own); flexmoe's own path (the whole model, then
shard_experts) peaks at ~3.8x. Measured with the kernel's high-water mark (flexmoe.bench.host_memory);
the figures are printed (pytest -s)."""

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
# 64 experts of 256 x 512 in 2 layers: 201 MiB of experts in float32, ~2 MiB of the rest
BIG_EXPERTS = dict(hidden_size=256, moe_intermediate_size=512, num_experts=64, num_experts_per_tok=2)


def load_worker(path: str, how: str) -> dict:
    from transformers import AutoModelForCausalLM

    import flexmoe.integrations.transformers as fx

    with host_memory.peak_growth() as grown:
        if how == "flexmoe_ep":
            model = fx.load_expert_parallel(path, dtype=torch.float32, experts_implementation="eager")
        else:  # flexmoe's own path: the whole model on every rank, then its experts sharded
            model = fx.shard_experts(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    local_experts = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
        for name, p in model.named_parameters()
        if ".experts." in name
    )
    return {**grown, "local_expert_bytes": local_experts}


@pytest.fixture(scope="module")
def pool():
    # fresh processes: nothing freed earlier in them that a load could reuse unseen
    with DistributedPool(W, collective_timeout_s=60.0, timeout_s=240.0) as p:
        yield p


@pytest.mark.xfail(
    strict=True, reason="transformers' loader reads every expert on every rank; flexmoe has no loader"
)
@pytest.mark.timeout(300)
def test_the_flexmoe_ep_loads_only_this_ranks_experts(pool, tmp_path):
    model = tiny_model("qwen3_moe", dtype=torch.float32, **BIG_EXPERTS)
    nbytes = {name: p.numel() * p.element_size() for name, p in model.named_parameters()}
    experts = sum(n for name, n in nbytes.items() if ".experts." in name)
    dense = sum(nbytes.values()) - experts
    model.save_pretrained(tmp_path)
    del model
    ep = pool.run(load_worker, str(tmp_path), "flexmoe_ep")  # first: these processes hold nothing yet
    whole = pool.run(load_worker, str(tmp_path), "shard_experts")
    MiB = 2**20
    for rank in range(W):
        print(
            f"rank {rank}: checkpoint experts {experts / MiB:.0f} MiB, dense {dense / MiB:.1f} MiB; peak "
            f"growth while loading: flexmoe EP {ep[rank]['peak_bytes'] / MiB:.0f} MiB, whole model + "
            f"shard_experts {whole[rank]['peak_bytes'] / MiB:.0f} MiB"
        )
    for rank in range(W):
        assert ep[rank]["local_expert_bytes"] == experts // W
        # this rank's experts, the dense part and the loader's own working memory, far from every expert
        assert ep[rank]["peak_bytes"] < experts // W + dense + experts // 4
        assert ep[rank]["peak_bytes"] > experts // W * 0.9  # the measurement sees what was loaded
        assert whole[rank]["peak_bytes"] > experts * 0.9  # the whole model passes through host memory
