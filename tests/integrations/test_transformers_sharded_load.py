"""flexmoe.integrations.transformers.load_expert_parallel reads a checkpoint through lazy entries
(rank_state_dict) that read only the rows a rank keeps. In one process: the safetensors reader and
the lazy slices against safetensors' own reading, the fused experts against transformers' own fusing
(Qwen3-MoE's gate/up/down, Mixtral's w1/w3/w2), the errors. On 2 gloo ranks: the loaded model gives
the logits of a plain one-process from_pretrained and holds exactly its experts' rows (Qwen3-MoE
from a checkpoint in several files, Mixtral, DeepSeek-V3 and its dense first layer, GPT-OSS's fused
experts under transformers' "all_to_all"); a checkpoint that does not fill the model raises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from flexmoe.testing.distributed import DistributedPool  # noqa: E402
from flexmoe.testing.hf_tiny import tiny_batch, tiny_model  # noqa: E402

W = 2
DTYPE = {"deepseek_v3": torch.float32}  # its router stays float32; FSDP2 wants one dtype per group
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5}
RUNS = {  # (experts_implementation, ep_implementation)
    "qwen3_moe": ("eager", "flexmoe"),
    "mixtral": ("eager", "flexmoe"),
    "deepseek_v3": ("eager", "flexmoe"),
    "gpt_oss": ("eager", "flexmoe"),  # its own gate between flexmoe's GEMMs
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    paths = {}
    for name in RUNS:
        model = tiny_model(name, dtype=DTYPE.get(name, torch.float64))
        # Qwen3-MoE in several files (through the index), the others in one
        model.save_pretrained(root / name, max_shard_size="40KB" if name == "qwen3_moe" else "1GB")
        paths[name] = str(root / name)
    return paths


def _meta_model(path: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


# ---- one process -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool]
)
def test_stored_rows_read_like_safetensors(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    from flexmoe.integrations.transformers.rank_state_dict import StoredRows
    from flexmoe.integrations.transformers.safetensors_files import checkpoint_tensors

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a": (torch.randn(5, 3, 4, generator=gen) * 10).to(dtype),
        "b": (torch.randn(7, generator=gen) * 10).to(dtype),
        "scalar": torch.tensor(3.5).to(dtype),
        "empty": torch.zeros(0, 4, dtype=dtype),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    want = load_file(tmp_path / "model.safetensors")
    lazy = {name: StoredRows(t) for name, t in checkpoint_tensors(tmp_path).items()}
    assert lazy["a"].get_shape() == [5, 3, 4] and lazy["a"].dtype == dtype
    for name in tensors:
        assert torch.equal(lazy[name][...], want[name]), name
    a = want["a"]
    indexes = [slice(1, 4), (slice(2, 5), slice(0, 3)), (slice(0, 2), slice(1, 3), slice(None))]
    indexes += [(Ellipsis, slice(1, 2)), (slice(3, 3),), (slice(4, 10),), (slice(None, None, 2),), 2]
    for index in indexes:
        assert torch.equal(lazy["a"][index], a[index]), index
    assert torch.equal(lazy["b"][2:6], want["b"][2:6])


def test_reader_errors(tmp_path):
    from safetensors.torch import save_file

    from flexmoe.integrations.transformers.safetensors_files import checkpoint_tensors

    with pytest.raises(ValueError, match="local directory"):
        checkpoint_tensors(tmp_path / "absent")
    with pytest.raises(ValueError, match="model.safetensors"):
        checkpoint_tensors(tmp_path)
    save_file({"a": torch.zeros(4, 8)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-16])  # the last rows cut off
    stored = checkpoint_tensors(tmp_path)["a"]
    stored.read_rows(0, 3, torch.empty(3, 8))
    with pytest.raises(ValueError, match="truncated"):
        stored.read_rows(0, 4, torch.empty(4, 8))
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        checkpoint_tensors(tmp_path)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_per_expert_checkpoints_fuse_as_transformers_fuses_them(saved, name):
    """Each fused entry, read whole or for some experts, is the parameter transformers' own loader
    builds; every other entry keeps its checkpoint name."""
    from transformers import AutoModelForCausalLM

    from flexmoe.integrations.transformers.rank_state_dict import StackedExperts, rank_state_dict

    dtype = DTYPE.get(name, torch.float64)
    plain = AutoModelForCausalLM.from_pretrained(saved[name], dtype=dtype, experts_implementation="eager")
    params = dict(plain.named_parameters())
    state = rank_state_dict(saved[name], _meta_model(saved[name]))
    fused = {key: entry for key, entry in state.items() if isinstance(entry, StackedExperts)}
    assert sorted(fused) == sorted(key for key in params if ".experts." in key)
    for key, entry in fused.items():
        assert torch.equal(entry[...], params[key]), key
        E = params[key].shape[0]
        assert torch.equal(entry[E // 2 : E], params[key][E // 2 :]), key
    assert not any(".experts." in key for key in state if key not in fused)


def test_gpt_oss_fused_experts_pass_through(saved):
    from flexmoe.integrations.transformers.rank_state_dict import StackedExperts, rank_state_dict

    state = rank_state_dict(saved["gpt_oss"], _meta_model(saved["gpt_oss"]))
    assert not any(isinstance(entry, StackedExperts) for entry in state.values())
    assert state["model.layers.0.mlp.experts.gate_up_proj"].get_shape() == [4, 16, 24]


def _without(src: str, dst, drop: str) -> str:
    """The checkpoint at `src` rewritten to `dst` without the tensor `drop`."""
    from safetensors.torch import load_file, save_file

    from flexmoe.integrations.transformers.safetensors_files import INDEX_NAME, SINGLE_NAME

    dst.mkdir()
    for f in Path(src).iterdir():
        if f.suffix == ".json" and f.name != INDEX_NAME:
            (dst / f.name).write_text(f.read_text())
    tensors = {}
    index = Path(src) / INDEX_NAME
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [SINGLE_NAME]
    )
    for file in files:
        tensors.update(load_file(Path(src) / file))
    del tensors[drop]
    save_file(tensors, dst / SINGLE_NAME, metadata={"format": "pt"})
    return str(dst)


def test_missing_expert_raises(saved, tmp_path):
    from flexmoe.integrations.transformers.rank_state_dict import rank_state_dict

    path = _without(
        saved["mixtral"], tmp_path / "ckpt", "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    )
    with pytest.raises(ValueError, match=r"3 tensors match .*w3.* model.layers.1.mlp.experts.gate_up_proj"):
        rank_state_dict(path, _meta_model(path))


def test_load_expert_parallel_refuses_what_it_sets(saved):
    import flexmoe.integrations.transformers as fx

    with pytest.raises(ValueError, match="state_dict"):
        fx.load_expert_parallel(saved["qwen3_moe"], state_dict={})
    with pytest.raises(ValueError, match="local directory"):
        fx.load_expert_parallel("no-such-model/anywhere")


# ---- 2 ranks -----------------------------------------------------------------------------------


def _batch(rank: int):
    return tiny_batch(seed=70 + rank, length=6 + rank)


def load_worker(path: str, experts: str, ep: str, dtype: torch.dtype) -> dict:
    import flexmoe.integrations.transformers as fx

    try:
        model = fx.load_expert_parallel(
            path, ep_implementation=ep, dtype=dtype, experts_implementation=experts
        )
    except ValueError as e:  # raised alike on every rank
        return {"error": str(e)}
    with torch.no_grad():
        logits = model(_batch(dist.get_rank())).logits
    local = {name: p.to_local().clone() for name, p in model.named_parameters() if ".experts." in name}
    return {"logits": logits, "local": local}


@pytest.fixture(scope="module")
def pool():
    with DistributedPool(W, collective_timeout_s=60.0, timeout_s=240.0) as p:
        yield p


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(RUNS))
def test_sharded_load_gives_the_plain_models_logits(pool, saved, name):
    from transformers import AutoModelForCausalLM

    dtype = DTYPE.get(name, torch.float64)
    experts, ep = RUNS[name]
    got = pool.run(load_worker, saved[name], experts, ep, dtype)
    plain = AutoModelForCausalLM.from_pretrained(saved[name], dtype=dtype, experts_implementation="eager")
    params = dict(plain.named_parameters())
    for rank, result in enumerate(got):
        assert "error" not in result, result["error"]
        with torch.no_grad():
            want = plain(_batch(rank)).logits
        torch.testing.assert_close(result["logits"], want, rtol=0, atol=ATOL[dtype])
        assert sorted(result["local"]) == sorted(key for key in params if ".experts." in key)
        for key, local in result["local"].items():
            L = params[key].shape[0] // W  # this rank's whole experts, exactly
            assert torch.equal(local, params[key][rank * L : (rank + 1) * L]), key


@pytest.mark.timeout(300)
def test_a_checkpoint_that_does_not_fill_the_model_raises(pool, saved, tmp_path):
    path = _without(saved["qwen3_moe"], tmp_path / "no_norm", "model.norm.weight")
    for result in pool.run(load_worker, path, "eager", "flexmoe", torch.float64):
        assert "does not fill the model" in result.get("error", "") and "model.norm.weight" in result["error"]
    uneven = tmp_path / "three_experts"
    tiny_model("qwen3_moe", num_experts=3).save_pretrained(uneven)
    for result in pool.run(load_worker, str(uneven), "eager", "flexmoe", torch.float64):
        assert "evenly shard 3 experts" in result.get("error", ""), result
