"""flexmoe inside transformers' own distributed training (DistributedConfig: EP + FSDP2) on 2 gloo
ranks, float64 (DeepSeek-V3 float32): a few SGD steps on per-rank batches give the losses of one
eager process trained on the union of the batches, as transformers' own "all_to_all" EP does, with
- ep_implementation="flexmoe" (flexmoe's plans and tuner over transformers' EP group), adaptive,
  and fixed plans registered under names of their own (r = 1 pipelined in 2 chunks; r = 0);
- experts_implementation="flexmoe" under transformers' "all_to_all" (local experts);
GPT-OSS's custom gate under both.

The one-process reference: SGD on the mean of the ranks' losses. torch 2.13's FSDP2 divides a
float64 expert gradient by the EP divide factor twice when each expert has one copy (efsdp_size 1:
its pre-division for overflow safety, then the division of its no-communication path), so the
reference is computed with the expert gradients scaled by 1 and by 1/2, and transformers' own EP
must match one of them; flexmoe must match the same one (and so equal transformers' own EP).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from flexmoe.testing.distributed import DistributedPool  # noqa: E402
from flexmoe.testing.hf_tiny import tiny_batch, tiny_model  # noqa: E402

W, LR, STEPS = 2, 0.3, 3
OVERRIDES = {"gpt_oss": dict(swiglu_limit=0.4)}  # the clamps bind on some entries of the small weights
# DeepSeek-V3 keeps its router in float32, and FSDP2 wants one dtype per group: a float32 model
DTYPE = {"deepseek_v3": torch.float32}
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5}
FIXED = {
    "flexmoe_r1_d2": dict(parallelism=1, pipeline_degree=2, all_to_all="flat"),
    "flexmoe_r0": dict(parallelism=0),
}


def _batch(rank: int, step: int):
    return tiny_batch(seed=40 + 7 * step + rank, length=6 + rank)


def train_worker(path: str, experts: str, ep: str, dtype: torch.dtype = torch.float64) -> dict:
    """STEPS SGD steps of the model at `path` under DistributedConfig(ep_size=W, fsdp_size=W)."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import flexmoe.integrations.transformers as fx

    for name, options in FIXED.items():
        fx.register_ep_implementation(name, **options)
    config = DistributedConfig(ep_size=W, fsdp_size=W, ep_implementation=ep)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, distributed_config=config, dtype=dtype, experts_implementation=experts
        )
    except ValueError as e:  # raised alike on every rank, before any collective of the layer
        return {"error": str(e)}
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    losses = []
    for step in range(STEPS):
        ids = _batch(dist.get_rank(), step)
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    layers = fx.ep_layers(model)
    return {
        "losses": torch.stack(losses),
        "layers": len(layers),
        "plans": sorted({layer.last_plan.source for layer in layers.values()}),
        "r": sorted({layer.last_plan.r for layer in layers.values()}),
    }


def _reference(name: str, expert_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """[STEPS, W] losses of one eager process: SGD on the mean of the ranks' losses."""
    model = tiny_model(name, dtype=dtype, **OVERRIDES.get(name, {}))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    out = []
    for step in range(STEPS):
        losses = [model(_batch(r, step), labels=_batch(r, step)).loss for r in range(W)]
        (sum(losses) / W).backward()
        for n, p in model.named_parameters():
            if ".experts." in n and p.grad is not None:
                p.grad *= expert_scale
        optimizer.step()
        optimizer.zero_grad()
        out.append(torch.stack([loss.detach() for loss in losses]))
    return torch.stack(out)


@pytest.fixture(scope="module")
def pool():
    with DistributedPool(W, collective_timeout_s=60.0, timeout_s=240.0) as p:
        yield p


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> a directory holding the tiny model, saved once (what from_pretrained loads)."""
    root = tmp_path_factory.mktemp("hf")
    paths = {}
    for name in ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"):
        tiny_model(name, **OVERRIDES.get(name, {})).save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def _losses(per_rank: list[dict]) -> torch.Tensor:
    for got in per_rank:
        assert "error" not in got, got["error"]
    return torch.stack([got["losses"] for got in per_rank], dim=1)  # [STEPS, W]


def _native_reference(pool, path: str, name: str) -> torch.Tensor:
    """The one-process losses that transformers' own EP matches (see the module docstring)."""
    dtype = DTYPE.get(name, torch.float64)
    native = _losses(pool.run(train_worker, path, "eager", "all_to_all", dtype))
    refs = [_reference(name, scale, dtype) for scale in (1.0, 0.5)]
    errors = [float((native - ref).abs().max()) for ref in refs]
    best = min(range(len(refs)), key=errors.__getitem__)
    assert errors[best] < ATOL[dtype], errors
    return refs[best]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_flexmoe_ep_trains_like_one_process(pool, saved, name):
    want = _native_reference(pool, saved[name], name)
    dtype = DTYPE.get(name, torch.float64)
    for experts, ep in [("eager", "flexmoe"), ("flexmoe", "all_to_all"), ("eager", "flexmoe_r1_d2")]:
        per_rank = pool.run(train_worker, saved[name], experts, ep, dtype)
        got = _losses(per_rank)
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL[dtype], msg=f"{experts}/{ep}")
        if ep.startswith("flexmoe"):
            assert per_rank[0]["layers"] == (1 if name == "deepseek_v3" else 2)  # every MoE block
            fixed = ep in FIXED
            assert all(s == "fixed" if fixed else s.startswith("tuner") for s in per_rank[0]["plans"])
        else:
            assert per_rank[0]["layers"] == 0


@pytest.mark.timeout(300)
def test_flexmoe_ep_data_parallel_plan(pool, saved):
    """r = 0: every rank all-gathers the group's experts (the module's local shards) and moves no
    token; the gradients are reduce-scattered back onto the shards."""
    want = _native_reference(pool, saved["qwen3_moe"], "qwen3_moe")
    per_rank = pool.run(train_worker, saved["qwen3_moe"], "eager", "flexmoe_r0")
    torch.testing.assert_close(_losses(per_rank), want, rtol=0, atol=1e-10)
    assert per_rank[0]["r"] == [0]


@pytest.mark.timeout(300)
def test_gpt_oss_custom_gate_trains_like_one_process(pool, saved):
    """GPT-OSS's own gate (interleaved gate/up columns, clamps, biases) runs between flexmoe's
    grouped GEMMs: in the flexmoe backend under transformers' "all_to_all", and under the flexmoe EP
    in every kind of plan (the tuner's, r = 1 pipelined in 2 chunks, r = 0 on gathered weights)."""
    want = _native_reference(pool, saved["gpt_oss"], "gpt_oss")
    for experts, ep in [("flexmoe", "all_to_all"), ("eager", "flexmoe"), ("eager", "flexmoe_r1_d2")]:
        got = _losses(pool.run(train_worker, saved["gpt_oss"], experts, ep))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=f"{experts}/{ep}")
    per_rank = pool.run(train_worker, saved["gpt_oss"], "eager", "flexmoe_r0")
    torch.testing.assert_close(_losses(per_rank), want, rtol=0, atol=1e-10)
    assert per_rank[0]["r"] == [0]


def test_registration_and_bad_options():
    from transformers.distributed.expert_parallel import EPImplementationInterface

    import flexmoe.integrations.transformers as fx

    assert EPImplementationInterface()["flexmoe"] is fx.FlexMoEEP
    with pytest.raises(ValueError, match="'group'"):
        fx.register_ep_implementation("bad", group=None)
    with pytest.raises(ValueError, match="name"):
        fx.register_ep_implementation("")
    cls = fx.ep_implementation_class(pipeline_degree=4)
    assert issubclass(cls, fx.FlexMoEEP) and cls.layer_options == {"pipeline_degree": 4}
    assert fx.FlexMoEEP.layer_options == {}


def bench_worker() -> list[dict]:
    from flexmoe.bench.hf import QUICK, two_process

    cpu = torch.device("cpu")
    return two_process(QUICK, batch=2, seq=8, repeats=1, warmup=0, device=cpu, layer_options={})


@pytest.mark.timeout(300)
def test_bench_hf_dist_compares_the_distributed_variants(pool):
    """`flexmoe bench hf --dist` keeps running (timings are never asserted): DDP, shard_experts,
    transformers' EP with its exchange and with flexmoe's; the experts' memory per rank halves; the
    MoE blocks' own time is found in every variant."""
    from flexmoe.bench.hf import DIST_VARIANTS

    rows = pool.run(bench_worker)[0]
    assert [row["variant"] for row in rows] == list(DIST_VARIANTS)
    for row in rows:
        assert row["step_ms"] > 0 and row["speedup_vs_hf_ep"] > 0 and row["world_size"] == W
        # the MoE blocks run inside the step, on every rank: their share cannot exceed it
        assert 0 < row["moe_blocks_ms"] < row["step_ms"] and row["moe_blocks_speedup_vs_hf_ep"] > 0
        assert row["memory_ratio"] == (1.0 if row["variant"] == "ddp_grouped_mm" else 0.5)


def save_worker(path: str, out: str) -> torch.Tensor:
    """A step under the "flexmoe" EP, then save_pretrained; returns the logits of a probe."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import flexmoe.integrations.transformers  # noqa: F401  (registers "flexmoe")

    config = DistributedConfig(ep_size=W, fsdp_size=W, ep_implementation="flexmoe")
    model = AutoModelForCausalLM.from_pretrained(
        path, distributed_config=config, dtype=torch.float64, experts_implementation="eager"
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    ids = _batch(dist.get_rank(), 0)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    with torch.no_grad():
        logits = model(_batch(0, 1)).logits
    model.save_pretrained(out)  # transformers gathers its shards (the experts among them)
    return logits


@pytest.mark.timeout(300)
def test_a_model_trained_under_the_flexmoe_ep_saves_for_plain_transformers(pool, saved, tmp_path):
    from transformers import AutoModelForCausalLM

    logits = pool.run(save_worker, saved["qwen3_moe"], str(tmp_path / "trained"))
    eager = dict(dtype=torch.float64, experts_implementation="eager")  # grouped_mm has no float64
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "trained", **eager)
    before = AutoModelForCausalLM.from_pretrained(saved["qwen3_moe"], **eager)
    with torch.no_grad():
        got, untrained = plain(_batch(0, 1)).logits, before(_batch(0, 1)).logits
    for rank_logits in logits:
        torch.testing.assert_close(got, rank_logits, rtol=0, atol=1e-10)
    assert not torch.allclose(got, untrained)  # the step changed the weights that were saved
