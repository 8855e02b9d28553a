"""Swin Transformer V2 (Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution", CVPR 2022),
written against torch alone, with the MLP of every block built by a pluggable factory so that MoE layers
can replace chosen MLPs from outside (see `flexmoe.models.swinv2_moe`).

What makes it V2 (paper section 3):
- scaled cosine attention: attn = cos(q, k) * exp(min(logit_scale, log 100)), logit_scale learnable per
  head (init log 10);
- log-spaced continuous relative position bias: relative offsets normalised to [-8, 8] and mapped by
  sign(x) * log2(|x| + 1) / log2(8), a 2-layer MLP (2 -> 512 -> heads) then 16 * sigmoid;
- res-post-norm: x = x + drop_path(norm(f(x))) instead of x + f(norm(x));
- patch merging with the LayerNorm after the 4C -> 2C reduction.

Window size and padding (what this file does, as SwinV2 does where SwinV2 says):
- A stage whose token grid has min(H, W) <= window_size uses window = min(H, W) and no shift.
- A grid not divisible by the window is zero-padded at the bottom/right to Hp x Wp; the cyclic shift and
  the window partition then run on the padded grid, and the padded keys are masked for every query, so
  what a real token receives does not depend on the padded values. Padded rows are cropped afterwards.
- Patch merging of an odd grid zero-pads one row/column at the bottom/right first (grid -> ceil(H / 2)).

Legend:
  B batch, C channels at a stage, H x W token grid at a stage, Hp x Wp the grid padded to a multiple of
  the window, L = H * W tokens, S window side, N = S * S tokens per window, nW windows per image,
  b = B * nW windows in the batch, h heads, d = C / h head dim, T = (2S - 1)^2 relative offsets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MlpFactory = Callable[[int, int, int, int], nn.Module]
"""mlp_factory(stage_index, block_index, dim, hidden_dim) -> module mapping [..., dim] to [..., dim]."""

MAX_LOGIT_SCALE = math.log(100.0)
CPB_HIDDEN = 512
CPB_RANGE = 8.0  # relative coordinates are normalised to [-8, 8] before the log map
MASK_VALUE = -1.0e4  # additive mask; exp underflows to exactly 0 in float32 and is finite in half precision


# ----------------------------------------------------------------------------------------------- config


def _int_tuple(name: str, value: object) -> tuple[int, ...]:
    try:
        out = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be a sequence of integers, got {value!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise ValueError(f"{name} must contain integers only, got {value!r}")
    return out


def _rate(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


@dataclass(frozen=True, kw_only=True)
class SwinV2Config:
    """Shape and regularisation of a SwinV2 classifier. Defaults are SwinV2-T at 256 px, window 8."""

    img_size: int | tuple[int, int] = 256
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000  # 0: no head, forward returns the pooled features
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.2
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    pretrained_window_sizes: tuple[int, ...] = ()  # () = 0 for every stage; else one entry per stage
    init_std: float = 0.02
    # SwinV2 (its reference code) zero-initialises the post-norm weights, so that every block starts as the
    # identity; without it the small models here train far slower and collapse at lr 1e-3.
    zero_init_post_norm: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # normalise list inputs (e.g. from a CLI) on the frozen instance
        img = (self.img_size, self.img_size) if isinstance(self.img_size, int) else self.img_size
        img = _int_tuple("img_size", img)
        if len(img) != 2 or min(img) < 1:
            raise ValueError(f"img_size must be a positive int or (height, width), got {self.img_size!r}")
        set_(self, "img_size", img if img[0] != img[1] else img[0])
        set_(self, "depths", _int_tuple("depths", self.depths))
        set_(self, "num_heads", _int_tuple("num_heads", self.num_heads))
        pws = _int_tuple("pretrained_window_sizes", self.pretrained_window_sizes)
        set_(self, "pretrained_window_sizes", pws or (0,) * len(self.depths))
        for name in ("patch_size", "in_chans", "embed_dim", "window_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if (
            isinstance(self.num_classes, bool)
            or not isinstance(self.num_classes, int)
            or self.num_classes < 0
        ):
            raise ValueError(f"num_classes must be an integer >= 0, got {self.num_classes!r}")
        if not self.depths or min(self.depths) < 1:
            raise ValueError(f"depths must be a non-empty tuple of positive integers, got {self.depths}")
        if len(self.num_heads) != len(self.depths):
            raise ValueError(
                f"num_heads must have one entry per stage ({len(self.depths)}), got {self.num_heads}"
            )
        if len(self.pretrained_window_sizes) != len(self.depths) or min(self.pretrained_window_sizes) < 0:
            raise ValueError(
                "pretrained_window_sizes must have one entry >= 0 per stage, "
                f"got {self.pretrained_window_sizes}"
            )
        for i, heads in enumerate(self.num_heads):
            if heads < 1 or self.stage_dim(i) % heads:
                raise ValueError(
                    f"num_heads[{i}]={heads} must be positive and divide the stage width {self.stage_dim(i)}"
                )
        h, w = self.img_hw
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size={self.patch_size}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")
        for name in ("drop_path_rate", "attn_drop", "proj_drop"):
            _rate(name, getattr(self, name))

    @property
    def img_hw(self) -> tuple[int, int]:
        return (self.img_size, self.img_size) if isinstance(self.img_size, int) else self.img_size

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    def stage_dim(self, stage: int) -> int:
        return self.embed_dim * 2**stage

    def stage_resolution(self, stage: int) -> tuple[int, int]:
        h, w = self.img_hw[0] // self.patch_size, self.img_hw[1] // self.patch_size
        for _ in range(stage):
            h, w = -(-h // 2), -(-w // 2)
        return h, w

    def hidden_dim(self, stage: int) -> int:
        return int(self.stage_dim(stage) * self.mlp_ratio)

    def drop_path_rates(self) -> list[float]:
        """Stochastic depth rate of every block in order, linearly from 0 to drop_path_rate."""
        n = sum(self.depths)
        return [self.drop_path_rate * i / max(n - 1, 1) for i in range(n)]


# ------------------------------------------------------------------------------ window and bias helpers


def window_partition(x_BHWC: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, S * S, C], windows in row-major order within each image."""
    B, H, W, C = x_BHWC.shape
    if H % window or W % window:
        raise ValueError(f"grid {H}x{W} is not divisible by the window size {window}")
    x = x_BHWC.view(B, H // window, window, W // window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, C)


def window_reverse(x_bNC: torch.Tensor, window: int, H: int, W: int) -> torch.Tensor:
    """Inverse of `window_partition`: [B * nW, S * S, C] -> [B, H, W, C]."""
    C = x_bNC.shape[-1]
    B = x_bNC.shape[0] // ((H // window) * (W // window))
    x = x_bNC.view(B, H // window, W // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


def relative_offsets(window: int) -> torch.Tensor:
    """All (dy, dx) offsets between two positions of a window, [T, 2] int64, row-major in (dy, dx)."""
    r = torch.arange(-(window - 1), window)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([dy.reshape(-1), dx.reshape(-1)], dim=1)


def relative_position_index(window: int) -> torch.Tensor:
    """[N, N] int64: row of `relative_offsets(window)` holding (y_i - y_j, x_i - x_j) for tokens i, j."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    y_N, x_N = ys.reshape(-1), xs.reshape(-1)
    dy_NN = y_N[:, None] - y_N[None, :] + (window - 1)
    dx_NN = x_N[:, None] - x_N[None, :] + (window - 1)
    return dy_NN * (2 * window - 1) + dx_NN


def log_spaced_coords(window: int, pretrained_window: int = 0) -> torch.Tensor:
    """[T, 2] float32: offsets scaled to [-8, 8] (by pretrained_window - 1 if set, else window - 1),
    then sign(x) * log2(|x| + 1) / log2(8)."""
    reference = pretrained_window if pretrained_window > 0 else window
    table = relative_offsets(window).to(torch.float32) / max(reference - 1, 1) * CPB_RANGE
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(CPB_RANGE)


def attention_mask(H: int, W: int, window: int, shift: int, Hp: int | None = None, Wp: int | None = None):
    """Blocked (True) query/key pairs of each window, [nW, N, N] bool, or None when nothing is blocked.

    The grid is H x W real tokens padded to Hp x Wp, then rolled by -shift on both axes. Within a window
    two tokens may attend to each other only if both or neither wrapped around in each axis (they were
    neighbours before the roll); a padded key is blocked for every query.
    """
    Hp, Wp = Hp or H, Wp or W
    if shift == 0 and (Hp, Wp) == (H, W):
        return None
    rows, cols = torch.arange(Hp), torch.arange(Wp)
    src_row, src_col = (rows + shift) % Hp, (cols + shift) % Wp  # grid position before the roll
    region_HW = ((rows + shift >= Hp).long() * 2)[:, None] + (cols + shift >= Wp).long()[None, :]
    padded_HW = (src_row >= H)[:, None] | (src_col >= W)[None, :]
    region_wN = window_partition(region_HW[None, :, :, None], window)[..., 0]
    padded_wN = window_partition(padded_HW[None, :, :, None], window)[..., 0]
    return (region_wN[:, :, None] != region_wN[:, None, :]) | padded_wN[:, None, :]


# ---------------------------------------------------------------------------------------------- modules


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p in training, scale by 1/(1-p)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """The dense MLP: Linear, GELU, dropout, Linear, dropout. Accepts any leading shape."""

    def __init__(self, dim: int, hidden_dim: int, *, drop: float = 0.0, init_std: float = 0.02):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)
        for fc in (self.fc1, self.fc2):
            nn.init.trunc_normal_(fc.weight, std=init_std)
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class ContinuousPositionBias(nn.Module):
    """Log-spaced continuous relative position bias of one window: [h, N, N], values in (0, 16)."""

    def __init__(self, window: int, num_heads: int, pretrained_window: int = 0):
        super().__init__()
        self.window = window
        self.mlp = nn.Sequential(
            nn.Linear(2, CPB_HIDDEN), nn.ReLU(inplace=True), nn.Linear(CPB_HIDDEN, num_heads, bias=False)
        )
        # derived from the window alone: not saved in checkpoints
        self.register_buffer("coords_T2", log_spaced_coords(window, pretrained_window), persistent=False)
        self.register_buffer("index_NN", relative_position_index(window), persistent=False)

    def forward(self) -> torch.Tensor:
        table_Th = self.mlp(self.coords_T2)
        bias_NNh = table_Th[self.index_NN]
        return 16.0 * torch.sigmoid(bias_NNh.permute(2, 0, 1))


class WindowAttention(nn.Module):
    """Scaled cosine multi-head self-attention inside windows: [b, N, C] -> [b, N, C]."""

    def __init__(
        self,
        dim: int,
        window: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pretrained_window: int = 0,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        # q and v biases; k has none (SwinV2)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb = ContinuousPositionBias(window, num_heads, pretrained_window)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x_bNC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v, each [b, h, N, d]."""
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        b, N, C = x_bNC.shape
        qkv = F.linear(x_bNC, self.qkv.weight, bias).view(b, N, 3, self.num_heads, C // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x_bNC: torch.Tensor, mask_wNN: torch.Tensor | None = None) -> torch.Tensor:
        """mask_wNN: additive mask per window of an image ([nW, N, N], b must be a multiple of nW)."""
        b, N, C = x_bNC.shape
        q, k, v = self.qkv_heads(x_bNC)
        attn_bhNN = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn_bhNN = attn_bhNN * torch.clamp(self.logit_scale, max=MAX_LOGIT_SCALE).exp()
        attn_bhNN = attn_bhNN + self.cpb().to(attn_bhNN.dtype)
        if mask_wNN is not None:
            nW = mask_wNN.shape[0]
            attn_bhNN = (
                attn_bhNN.view(b // nW, nW, self.num_heads, N, N) + mask_wNN.to(attn_bhNN.dtype)[:, None]
            )
            attn_bhNN = attn_bhNN.view(b, self.num_heads, N, N)
        attn_bhNN = self.attn_drop(attn_bhNN.softmax(dim=-1))
        out_bNC = (attn_bhNN @ v).transpose(1, 2).reshape(b, N, C)
        return self.proj_drop(self.proj(out_bNC))


class SwinV2Block(nn.Module):
    """(Shifted-)window attention and an MLP, each with a res-post-norm residual: [B, L, C] -> [B, L, C]."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        num_heads: int,
        *,
        window_size: int,
        shifted: bool,
        mlp: nn.Module,
        drop_path: float = 0.0,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pretrained_window: int = 0,
    ):
        super().__init__()
        H, W = resolution
        self.resolution = resolution
        self.window = min(window_size, H, W)
        self.shift = self.window // 2 if shifted and min(H, W) > window_size else 0
        self.padded = (-(-H // self.window) * self.window, -(-W // self.window) * self.window)
        self.attn = WindowAttention(
            dim,
            self.window,
            num_heads,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            pretrained_window=pretrained_window,
        )
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = mlp
        self.norm2 = nn.LayerNorm(dim)
        self.drop_path = DropPath(drop_path)
        blocked = attention_mask(H, W, self.window, self.shift, *self.padded)
        mask = None if blocked is None else torch.zeros(blocked.shape).masked_fill_(blocked, MASK_VALUE)
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        x_BLC = x_BLC + self.drop_path(self.norm1(self.attend(x_BLC)))
        return x_BLC + self.drop_path(self.norm2(self.mlp(x_BLC)))

    def attend(self, x_BLC: torch.Tensor) -> torch.Tensor:
        """Window attention of every token: pad, shift, attend within windows, unshift, crop."""
        (H, W), (Hp, Wp) = self.resolution, self.padded
        B, L, C = x_BLC.shape
        if L != H * W:
            raise ValueError(f"expected {H}x{W}={H * W} tokens, got {L}")
        x_BHWC = F.pad(x_BLC.reshape(B, H, W, C), (0, 0, 0, Wp - W, 0, Hp - H))
        return self.attend_padded(x_BHWC)[:, :H, :W].reshape(B, L, C)

    def attend_padded(self, x_BHpWpC: torch.Tensor) -> torch.Tensor:
        """Window attention on the padded grid [B, Hp, Wp, C]; padded keys are masked out."""
        Hp, Wp = self.padded
        x = x_BHpWpC
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        out_bNC = self.attn(window_partition(x, self.window), self.attn_mask)
        x = window_reverse(out_bNC, self.window, Hp, Wp)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x


class PatchMerging(nn.Module):
    """V2 patch merging: 2x2 neighbours concatenated, Linear 4C -> 2C, then LayerNorm(2C).
    [B, H*W, C] -> [B, ceil(H/2)*ceil(W/2), 2C]; an odd grid is zero-padded bottom/right first."""

    def __init__(self, dim: int, resolution: tuple[int, int]):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        H, W = self.resolution
        B, _, C = x_BLC.shape
        x = F.pad(x_BLC.reshape(B, H, W, C), (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.norm(self.reduction(x.reshape(B, -1, 4 * C)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches: [B, in_chans, H_img, W_img] -> conv -> [B, L, C] -> LayerNorm."""

    def __init__(self, img_hw: tuple[int, int], patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.img_hw, self.in_chans = img_hw, in_chans
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        if x_BCHW.dim() != 4 or x_BCHW.shape[1] != self.in_chans or tuple(x_BCHW.shape[2:]) != self.img_hw:
            raise ValueError(
                f"expected images [B, {self.in_chans}, {self.img_hw[0]}, {self.img_hw[1]}], "
                f"got {list(x_BCHW.shape)}"
            )
        return self.norm(self.proj(x_BCHW).flatten(2).transpose(1, 2))


class SwinV2Stage(nn.Module):
    """The blocks of one stage (shift on odd blocks), then patch merging unless it is the last stage."""

    def __init__(self, config: SwinV2Config, stage: int, drop_paths: list[float], mlp_factory: MlpFactory):
        super().__init__()
        dim, resolution = config.stage_dim(stage), config.stage_resolution(stage)
        self.blocks = nn.ModuleList(
            SwinV2Block(
                dim,
                resolution,
                config.num_heads[stage],
                window_size=config.window_size,
                shifted=i % 2 == 1,
                mlp=mlp_factory(stage, i, dim, config.hidden_dim(stage)),
                drop_path=drop_paths[i],
                qkv_bias=config.qkv_bias,
                attn_drop=config.attn_drop,
                proj_drop=config.proj_drop,
                pretrained_window=config.pretrained_window_sizes[stage],
            )
            for i in range(config.depths[stage])
        )
        last = stage == config.num_stages - 1
        self.downsample = None if last else PatchMerging(dim, resolution)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x_BLC = block(x_BLC)
        return x_BLC if self.downsample is None else self.downsample(x_BLC)


class SwinV2(nn.Module):
    """SwinV2 image classifier: [B, in_chans, H_img, W_img] -> logits [B, num_classes].

    mlp_factory(stage_index, block_index, dim, hidden_dim) builds each block's MLP; the default is the
    dense `Mlp`. Modules it returns are left as they were built (not re-initialised here).
    """

    def __init__(self, config: SwinV2Config, *, mlp_factory: MlpFactory | None = None):
        super().__init__()
        self.config = config
        if mlp_factory is None:

            def mlp_factory(stage: int, block: int, dim: int, hidden: int) -> nn.Module:
                return Mlp(dim, hidden, drop=config.proj_drop, init_std=config.init_std)

        self.patch_embed = PatchEmbed(config.img_hw, config.patch_size, config.in_chans, config.embed_dim)
        rates, start = config.drop_path_rates(), 0
        stages = []
        for s, depth in enumerate(config.depths):
            stages.append(SwinV2Stage(config, s, rates[start : start + depth], mlp_factory))
            start += depth
        self.stages = nn.ModuleList(stages)
        self.num_features = config.stage_dim(config.num_stages - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, config.num_classes) if config.num_classes else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.config.init_std
        external = {id(m) for stage in self.stages for blk in stage.blocks for m in blk.mlp.modules()}
        for m in self.modules():
            if id(m) in external:
                continue
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.config.zero_init_post_norm:
            for blk in self.blocks():
                for norm in (blk.norm1, blk.norm2):
                    nn.init.zeros_(norm.weight)

    def blocks(self) -> list[SwinV2Block]:
        return [blk for stage in self.stages for blk in stage.blocks]

    def forward_features(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, C_last]."""
        x_BLC = self.patch_embed(x_BCHW)
        for stage in self.stages:
            x_BLC = stage(x_BLC)
        return self.norm(x_BLC).mean(dim=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x_BCHW))

    @property
    def aux_loss(self) -> torch.Tensor:
        """Sum of the tensor `aux_loss` of every submodule (0-dim zero when there is none)."""
        total = None
        for m in self.modules():
            if m is self:
                continue
            loss = getattr(m, "aux_loss", None)
            if isinstance(loss, torch.Tensor):
                total = loss if total is None else total + loss
        return torch.zeros((), device=self.norm.weight.device) if total is None else total

    @staticmethod
    def no_weight_decay_keywords() -> set[str]:
        """Parameter-name fragments SwinV2 trains without weight decay."""
        return {"cpb.mlp", "logit_scale"}
