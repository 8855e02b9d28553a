"""SwinV2 (dense): windowed attention against direct computations, masks, bias tables, shapes, padding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flexmoe.models import create_model, list_models, model_config
from flexmoe.models.swinv2 import (
    MASK_VALUE,
    DropPath,
    PatchMerging,
    SwinV2,
    SwinV2Block,
    SwinV2Config,
    attention_mask,
    log_spaced_coords,
    relative_offsets,
    relative_position_index,
    window_partition,
    window_reverse,
)


def small_config(**overrides) -> SwinV2Config:
    base = dict(
        img_size=16,
        patch_size=2,
        in_chans=1,
        num_classes=5,
        embed_dim=8,
        depths=(2, 2),
        num_heads=(2, 4),
        window_size=4,
        mlp_ratio=2.0,
        drop_path_rate=0.0,
    )
    return SwinV2Config(**{**base, **overrides})


def make_block(
    dim: int, resolution, *, window: int, shifted: bool, heads: int = 2, seed: int = 0
) -> SwinV2Block:
    torch.manual_seed(seed)
    block = SwinV2Block(
        dim, resolution, heads, window_size=window, shifted=shifted, mlp=nn.Identity(), pretrained_window=0
    )
    with torch.no_grad():  # non-trivial parameters everywhere
        for p in block.parameters():
            p.normal_(0, 0.3)
        block.attn.logit_scale.fill_(math.log(10.0))
    return block.double().eval()


def reference_attend(block: SwinV2Block, x_BLC: torch.Tensor) -> torch.Tensor:
    """Shifted-window attention written directly over all L tokens of the image.

    Token p = (y, x) sits at rolled position ((y - s) mod Hp, (x - s) mod Wp). Tokens i, j may attend iff
    their rolled positions share a window and neither or both wrapped in each axis; the bias comes from
    the (unwrapped) offset y_i - y_j, x_i - x_j through the log map and the CPB MLP.
    """
    (H, W), (Hp, Wp), S, s = block.resolution, block.padded, block.window, block.shift
    attn = block.attn
    B, L, C = x_BLC.shape
    h, d = attn.num_heads, C // attn.num_heads
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    ry, rx = (ys - s) % Hp, (xs - s) % Wp
    wrap_y, wrap_x = ys < s, xs < s  # wrapped around by the roll
    allowed = (
        (ry[:, None] // S == ry[None, :] // S)
        & (rx[:, None] // S == rx[None, :] // S)
        & (wrap_y[:, None] == wrap_y[None, :])
        & (wrap_x[:, None] == wrap_x[None, :])
    )
    dy = (ys[:, None] - ys[None, :]).double() * 8 / max(S - 1, 1)
    dx = (xs[:, None] - xs[None, :]).double() * 8 / max(S - 1, 1)
    coords = torch.stack([dy, dx], dim=-1)
    coords = torch.sign(coords) * torch.log2(coords.abs() + 1) / 3.0
    bias = 16 * torch.sigmoid(attn.cpb.mlp(coords)).permute(2, 0, 1)  # [h, L, L]

    bias_qkv = torch.cat([attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias])
    qkv = (x_BLC @ attn.qkv.weight.T + bias_qkv).view(B, L, 3, h, d)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    cos = (q / q.norm(dim=-1, keepdim=True)) @ (k / k.norm(dim=-1, keepdim=True)).transpose(-1, -2)
    logits = cos * torch.exp(torch.clamp(attn.logit_scale, max=math.log(100.0))) + bias
    logits = logits.masked_fill(~allowed, float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, L, C)
    return attn.proj(out)


# ------------------------------------------------------------------------------------- windows and index


@pytest.mark.parametrize("shape,window", [((2, 8, 8, 3), 4), ((1, 6, 9, 2), 3), ((3, 5, 5, 1), 5)])
def test_window_partition_round_trip_and_layout(shape, window):
    x = torch.randn(shape)
    B, H, W, C = shape
    windows = window_partition(x, window)
    nW = (H // window) * (W // window)
    assert windows.shape == (B * nW, window * window, C)
    assert torch.equal(window_reverse(windows, window, H, W), x)
    # window w of image b, token n = (n // S, n % S) inside it
    b, wy, wx, n = B - 1, H // window - 1, 0, window + 1
    w = b * nW + wy * (W // window) + wx
    assert torch.equal(windows[w, n], x[b, wy * window + n // window, wx * window + n % window])


def test_window_partition_rejects_indivisible_grid():
    with pytest.raises(ValueError, match="not divisible"):
        window_partition(torch.zeros(1, 5, 4, 1), 4)


def test_relative_position_index_2x2_by_hand():
    expected = torch.tensor([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    assert torch.equal(relative_position_index(2), expected)


def test_relative_position_index_3x3():
    index = relative_position_index(3)
    assert index.shape == (9, 9)
    assert (
        index[0, 8] == 0 and index[8, 0] == 24 and index[4, 4] == 12
    )  # (-2,-2), (2,2), (0,0) of a 5x5 table
    assert index[1, 0] == 13 and index[3, 0] == 17  # (0, 1) and (1, 0)
    offsets = relative_offsets(3)
    for i in range(9):
        for j in range(9):
            assert offsets[index[i, j]].tolist() == [i // 3 - j // 3, i % 3 - j % 3]


def test_log_spaced_coords_values():
    table = log_spaced_coords(8)
    assert table.shape == (15 * 15, 2)
    offsets = relative_offsets(8).tolist()
    edge = math.log2(9) / 3  # offset 7 of window 8 -> 8 -> log2(9) / log2(8)
    assert table[offsets.index([7, 0])].tolist() == pytest.approx([edge, 0.0])
    assert table[offsets.index([-7, -7])].tolist() == pytest.approx([-edge, -edge])
    assert table[offsets.index([0, 1])].tolist() == pytest.approx([0.0, math.log2(8 / 7 + 1) / 3])
    assert table.abs().max().item() == pytest.approx(edge)
    # with a pretrained window the offsets are scaled by pretrained - 1 instead
    pretrained = log_spaced_coords(8, pretrained_window=16)
    assert pretrained[offsets.index([7, 0])].tolist() == pytest.approx([math.log2(7 / 15 * 8 + 1) / 3, 0.0])
    assert torch.equal(log_spaced_coords(1), torch.zeros(1, 2))  # window 1: no offsets, no division by 0


# ------------------------------------------------------------------------------------------------- masks


def region_mask_by_slices(H, W, window, shift):
    """The region-id construction: label 9 regions by slices of the padded grid, compare within windows."""
    Hp, Wp = -(-H // window) * window, -(-W // window) * window
    region = torch.zeros(Hp, Wp, dtype=torch.long)
    label = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            region[hs, ws] = label
            label += 1
    nWy, nWx = Hp // window, Wp // window
    expected = torch.zeros(nWy * nWx, window * window, window * window, dtype=torch.bool)
    for wy in range(nWy):
        for wx in range(nWx):
            cells = [(wy * window + n // window, wx * window + n % window) for n in range(window * window)]
            for i, (yi, xi) in enumerate(cells):
                for j, (yj, xj) in enumerate(cells):
                    padded_key = (yj + shift) % Hp >= H or (xj + shift) % Wp >= W
                    expected[wy * nWx + wx, i, j] = region[yi, xi] != region[yj, xj] or padded_key
    return expected


@pytest.mark.parametrize("H,W,window,shift", [(8, 8, 4, 2), (6, 6, 4, 2), (8, 12, 4, 1), (7, 5, 3, 1)])
def test_shift_mask_blocks_exactly_cross_region_pairs(H, W, window, shift):
    Hp, Wp = -(-H // window) * window, -(-W // window) * window
    blocked = attention_mask(H, W, window, shift, Hp, Wp)
    assert torch.equal(blocked, region_mask_by_slices(H, W, window, shift))


def test_no_mask_without_shift_or_padding():
    assert attention_mask(8, 8, 4, 0) is None
    padded_only = attention_mask(6, 6, 4, 0, 8, 8)
    assert padded_only.any() and not padded_only[0].any()  # the top-left window holds real tokens only


def test_block_mask_buffer_values():
    block = SwinV2Block(8, (8, 8), 2, window_size=4, shifted=True, mlp=nn.Identity())
    assert block.shift == 2 and block.attn_mask.shape == (4, 16, 16)
    assert set(block.attn_mask.unique().tolist()) == {0.0, MASK_VALUE}
    assert "attn_mask" not in block.state_dict()


# ------------------------------------------------------------------------------------- window attention


def test_one_window_equals_full_attention():
    block = make_block(8, (4, 4), window=4, shifted=False)
    assert block.window == 4 and block.shift == 0 and block.attn_mask is None
    x = torch.randn(2, 16, 8, dtype=torch.float64)
    torch.testing.assert_close(block.attend(x), reference_attend(block, x))


@pytest.mark.parametrize(
    "resolution,window,shifted",
    [((8, 8), 4, False), ((8, 8), 4, True), ((6, 6), 4, True), ((6, 10), 4, True), ((7, 5), 3, False)],
)
def test_windowed_attention_matches_direct_masked_attention(resolution, window, shifted):
    block = make_block(8, resolution, window=window, shifted=shifted)
    x = torch.randn(2, resolution[0] * resolution[1], 8, dtype=torch.float64)
    torch.testing.assert_close(block.attend(x), reference_attend(block, x))


def test_window_is_clamped_to_small_resolution():
    block = SwinV2Block(8, (4, 4), 2, window_size=7, shifted=True, mlp=nn.Identity())
    assert (block.window, block.shift, block.padded) == (4, 0, (4, 4))
    wide = SwinV2Block(8, (3, 9), 2, window_size=7, shifted=True, mlp=nn.Identity())
    assert (wide.window, wide.shift, wide.padded) == (3, 0, (3, 9))


def test_padded_values_do_not_change_real_tokens():
    block = make_block(8, (6, 6), window=4, shifted=True)
    assert block.padded == (8, 8)
    real = torch.randn(2, 6, 6, 8, dtype=torch.float64)
    zeros = torch.zeros(2, 8, 8, 8, dtype=torch.float64)
    zeros[:, :6, :6] = real
    noisy = torch.randn(2, 8, 8, 8, dtype=torch.float64) * 5
    noisy[:, :6, :6] = real
    out_zero, out_noisy = block.attend_padded(zeros), block.attend_padded(noisy)
    torch.testing.assert_close(out_zero[:, :6, :6], out_noisy[:, :6, :6])
    assert torch.isfinite(out_noisy).all()


def test_logit_scale_is_capped_at_100():
    block = make_block(8, (4, 4), window=4, shifted=False)
    x = torch.randn(1, 16, 8, dtype=torch.float64)
    with torch.no_grad():
        block.attn.logit_scale.fill_(math.log(100.0))
    capped = block.attend(x)
    with torch.no_grad():
        block.attn.logit_scale.fill_(10.0)
    torch.testing.assert_close(block.attend(x), capped)


# ------------------------------------------------------------------------------------------ model parts


def test_patch_merging_pads_odd_grid_and_normalizes_after_reduction():
    merge = PatchMerging(4, (5, 3))
    x = torch.randn(2, 15, 4)
    out = merge(x)
    assert out.shape == (2, 3 * 2, 8)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 6), atol=1e-5, rtol=0)
    grid = torch.nn.functional.pad(x.view(2, 5, 3, 4), (0, 0, 0, 1, 0, 1))
    first = torch.cat([grid[:, 0, 0], grid[:, 1, 0], grid[:, 0, 1], grid[:, 1, 1]], dim=-1)
    torch.testing.assert_close(out[:, 0], merge.norm(merge.reduction(first)))


def test_drop_path():
    drop = DropPath(0.5)
    x = torch.ones(1000, 3)
    assert torch.equal(drop.eval()(x), x)
    y = drop.train()(x)
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    assert (y[:, 0:1] == y).all()  # whole samples are dropped
    assert 0.35 < (y[:, 0] == 0).float().mean() < 0.65


@pytest.mark.parametrize(
    "overrides,grids",
    [
        (dict(img_size=16, patch_size=2, window_size=4), [(8, 8), (4, 4)]),
        (
            dict(img_size=28, patch_size=2, window_size=4, depths=(2, 2, 2), num_heads=(2, 2, 4)),
            [(14, 14), (7, 7), (4, 4)],
        ),
        (dict(img_size=(12, 20), patch_size=2, window_size=3), [(6, 10), (3, 5)]),
        (dict(img_size=20, patch_size=4, window_size=7), [(5, 5), (3, 3)]),
    ],
)
def test_output_shapes(overrides, grids):
    cfg = small_config(**overrides)
    assert [cfg.stage_resolution(i) for i in range(cfg.num_stages)] == grids
    model = SwinV2(cfg).eval()
    h, w = cfg.img_hw
    x = torch.randn(3, 1, h, w)
    out = model(x)
    assert out.shape == (3, 5) and torch.isfinite(out).all()
    features = SwinV2(small_config(**overrides, num_classes=0))(x)
    assert features.shape == (3, cfg.stage_dim(cfg.num_stages - 1))


def test_backward_through_padded_shifted_blocks_is_finite():
    model = SwinV2(small_config(img_size=28, patch_size=2, window_size=4, drop_path_rate=0.1))
    x = torch.randn(2, 1, 28, 28)
    model(x).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_wrong_image_shape_is_a_clear_error():
    model = SwinV2(small_config())
    with pytest.raises(ValueError, match=r"expected images \[B, 1, 16, 16\]"):
        model(torch.randn(1, 3, 16, 16))


def test_drop_path_rates_increase_linearly():
    model = SwinV2(small_config(drop_path_rate=0.3))
    rates = [blk.drop_path.p for blk in model.blocks()]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_zero_init_post_norm_option():
    model = SwinV2(small_config())
    assert all((blk.norm1.weight == 0).all() and (blk.norm2.weight == 0).all() for blk in model.blocks())
    model = SwinV2(small_config(zero_init_post_norm=False))
    assert all((blk.norm1.weight == 1).all() and (blk.norm2.weight == 1).all() for blk in model.blocks())


# ----------------------------------------------------------------------------------------- mlp factory


class StubAuxMlp(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self.aux_loss = None  # nothing before the first forward

    def forward(self, x):
        self.aux_loss = torch.tensor(self.value) * x.mean() ** 0  # a tensor, as an MoE layer leaves it
        return x


def test_aux_loss_sums_submodule_losses():
    calls = []

    def factory(stage, block, dim, hidden):
        calls.append((stage, block, dim, hidden))
        return StubAuxMlp(10.0**stage + block)

    cfg = small_config()
    model = SwinV2(cfg, mlp_factory=factory)
    assert calls == [(0, 0, 8, 16), (0, 1, 8, 16), (1, 0, 16, 32), (1, 1, 16, 32)]
    assert model.aux_loss.shape == () and model.aux_loss.item() == 0.0
    model(torch.randn(2, 1, 16, 16))
    assert model.aux_loss.item() == pytest.approx(1 + 2 + 10 + 11)


def test_dense_model_aux_loss_is_zero_scalar():
    loss = SwinV2(small_config()).aux_loss
    assert loss.shape == () and loss.item() == 0.0


def test_factory_modules_are_not_reinitialised():
    def factory(stage, block, dim, hidden):
        layer = nn.Linear(dim, dim)
        nn.init.constant_(layer.weight, 0.5)
        return layer

    model = SwinV2(small_config(), mlp_factory=factory)
    assert all((blk.mlp.weight == 0.5).all() for blk in model.blocks())


# -------------------------------------------------------------------------------------- config, registry


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(num_heads=(2,)), "num_heads"),
        (dict(num_heads=(3, 4)), "num_heads"),
        (dict(img_size=15), "img_size"),
        (dict(window_size=0), "window_size"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(depths=()), "depths"),
        (dict(pretrained_window_sizes=(8,)), "pretrained_window_sizes"),
        (dict(mlp_ratio=0), "mlp_ratio"),
        (dict(num_classes=-1), "num_classes"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        small_config(**overrides)


def test_config_accepts_lists():
    cfg = small_config(depths=[2, 2], num_heads=[2, 4])
    assert cfg.depths == (2, 2) and cfg.pretrained_window_sizes == (0, 0)


def test_registry_dense_model():
    assert {"swinv2_tiny", "swinv2_moe_tiny", "swinv2_moe_small", "swinv2_moe_base"} <= set(list_models())
    model = create_model("swinv2_tiny", embed_dim=16, num_heads=(1, 2, 4, 8))
    assert isinstance(model, SwinV2) and model.config.embed_dim == 16
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model_config("swinv2_t_256").window_size == 8


def test_registry_errors_list_accepted_names():
    with pytest.raises(ValueError, match="swinv2_moe_tiny"):
        create_model("resnet50")
    with pytest.raises(ValueError, match="no config field"):
        create_model("swinv2_tiny", num_experts=4)
