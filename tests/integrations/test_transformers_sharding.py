"""shard_experts / unshard_experts on 2 gloo ranks (float64): each rank holds 1/W of the expert
parameters, its logits equal the unsharded model's on its batch, and after an SGD step with the
gradient of the summed losses the unsharded parameters equal the single-process update."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

from flexmoe.core.experts import is_expert_param  # noqa: E402
from flexmoe.testing.distributed import DistributedPool  # noqa: E402
from flexmoe.testing.hf_tiny import tiny_batch, tiny_model  # noqa: E402

LR = 0.3
CASES = [
    dict(name="qwen3_moe"),  # E=4 >= W: whole experts per rank, adaptive plans
    dict(name="deepseek_v3"),  # sigmoid, grouped routing, shared experts: all stay with the model
    dict(name="mixtral", overrides=dict(num_local_experts=1, num_experts_per_tok=1)),  # E < W: hidden slices
    dict(name="qwen2_moe", options=dict(parallelism=1, pipeline_degree=2, all_to_all="flat")),  # fixed
]


def _batch(rank: int):
    return tiny_batch(seed=40 + rank, length=6 + rank)


def shard_worker(case: dict) -> dict:
    import flexmoe.integrations.transformers as fx

    rank = dist.get_rank()
    model = tiny_model(case["name"], **case.get("overrides", {}))
    full = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    fx.shard_experts(model, **case.get("options", {}))
    held = sum(p.numel() for p in model.parameters() if is_expert_param(p))
    hf_left = sum(
        p.numel() for n, p in model.named_parameters() if ".experts." in n and not is_expert_param(p)
    )
    model.train()
    ids = _batch(rank)
    out = model(ids, labels=ids)
    out.loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is None:
                continue
            if not is_expert_param(p):  # replicated parameters: the summed losses' gradient too
                dist.all_reduce(p.grad)
            p -= LR * p.grad
    plans = {m.flexmoe_layer.last_plan.source for m in fx.moe_experts_modules(model).values()}
    fx.unshard_experts(model)
    return {
        "logits": out.logits.detach(),
        "full": full,
        "held": held,
        "hf_left": hf_left,
        "plans": plans,
        "implementation": model.config._experts_implementation,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


@pytest.fixture(scope="module")
def pool():
    with DistributedPool(2, collective_timeout_s=60.0, timeout_s=240.0) as p:
        yield p


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_sharded_model_matches_single_process(pool, case):
    per_rank = pool.run(shard_worker, case)
    ref = tiny_model(case["name"], **case.get("overrides", {}))
    ref.train()
    total = 0
    for rank in range(2):
        ids = _batch(rank)
        out = ref(ids, labels=ids)
        torch.testing.assert_close(per_rank[rank]["logits"], out.logits.detach(), rtol=0, atol=1e-10)
        total = total + out.loss
    total.backward()
    with torch.no_grad():
        for p in ref.parameters():
            if p.grad is not None:
                p -= LR * p.grad
    want = dict(ref.named_parameters())
    for rank, got in enumerate(per_rank):
        assert got["held"] * 2 == got["full"] and got["hf_left"] == 0, got
        assert got["implementation"] == "eager"  # unshard restored the previous implementation
        fixed = "options" in case
        assert all(s == "fixed" if fixed else s.startswith("tuner") for s in got["plans"]), got["plans"]
        assert got["params"].keys() == want.keys()
        for n, p in want.items():
            torch.testing.assert_close(
                got["params"][n], p.detach(), rtol=0, atol=1e-10, msg=f"rank {rank} {n}"
            )


def test_shard_experts_refuses_bad_calls():
    import flexmoe.integrations.transformers as fx

    model = tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match="no sharded experts"):
        fx.unshard_experts(model)
    with pytest.raises(ValueError, match="'activation'"):
        fx.shard_experts(model, activation="gelu")
    with pytest.raises(ValueError, match="no transformers experts"):
        fx.shard_experts(torch.nn.Linear(2, 2))
    fx.shard_experts(model)  # one process: W = 1, every expert held locally
    with pytest.raises(ValueError, match="sharded already"):
        fx.shard_experts(model)
    ids = tiny_batch()
    logits = model(ids).logits
    fx.unshard_experts(model)
    torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=1e-12)


def shard_train_save_worker(path: str) -> None:
    import flexmoe.integrations.transformers as fx
    from flexmoe.checkpoint import save_checkpoint

    model = tiny_model("deepseek_v3")
    fx.shard_experts(model)
    model.train()
    ids = _batch(dist.get_rank())
    model(ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                if not is_expert_param(p):
                    dist.all_reduce(p.grad)
                p -= LR * p.grad
    save_checkpoint(path, model, step=1)


@pytest.mark.timeout(300)
def test_checkpoint_of_a_sharded_model_reslices_to_one_process(pool, tmp_path):
    import flexmoe.integrations.transformers as fx
    from flexmoe.checkpoint import load_checkpoint

    path = str(tmp_path / "ckpt")
    pool.run(shard_train_save_worker, path)
    ref = tiny_model("deepseek_v3")
    ref.train()
    sum(ref(_batch(r), labels=_batch(r)).loss for r in range(2)).backward()
    with torch.no_grad():
        for p in ref.parameters():
            if p.grad is not None:
                p -= LR * p.grad
    model = fx.shard_experts(tiny_model("deepseek_v3", seed=5))  # other weights: all must be loaded
    assert load_checkpoint(path, model)["world_size"] == 2
    fx.unshard_experts(model)
    want = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[n].detach(), rtol=0, atol=1e-10, msg=n)


def shard_ddp_worker() -> dict:
    import flexmoe.integrations.transformers as fx
    from flexmoe.parallel.data_parallel import unwrap, wrap_data_parallel

    model = fx.shard_experts(tiny_model("qwen2_moe"))
    ddp = wrap_data_parallel(model)  # DDP for the replicated parameters, expert shards left out
    ddp.train()
    ids = _batch(dist.get_rank())
    ddp(ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in ddp.parameters():
            if p.grad is not None:
                p -= LR * p.grad
    model = fx.unshard_experts(unwrap(ddp))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.timeout(300)
def test_sharded_model_under_flexmoe_ddp_trains_like_one_process_on_the_mean_loss(pool):
    per_rank = pool.run(shard_ddp_worker)
    ref = tiny_model("qwen2_moe")
    ref.train()
    (sum(ref(_batch(r), labels=_batch(r)).loss for r in range(2)) / 2).backward()
    with torch.no_grad():
        for p in ref.parameters():
            if p.grad is not None:
                p -= LR * p.grad
    for got in per_rank:
        for n, p in ref.named_parameters():
            torch.testing.assert_close(got[n], p.detach(), rtol=0, atol=1e-10, msg=n)
