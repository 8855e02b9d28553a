"""The one sharded layout of expert parameters (DESIGN section 1).

Every rank holds exactly 1/W of all expert parameters, whatever plan runs:
- E >= W: E_local = E / W whole experts per rank (rank i holds experts i*E_local .. (i+1)*E_local - 1).
- E <  W: s = W / E ranks share one expert; rank i holds expert i // s, hidden slice i % s
  (H_shard = H / s) and the fc2 bias slice i % s (M_shard = M / s).

Legend: E experts, E_local experts on this rank, M model dim, H hidden dim, W ranks, s = max(1, W / E).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def shards_per_expert(num_experts: int, world_size: int) -> int:
    """s = W / E ranks share one expert when E < W, else 1."""
    return max(1, world_size // num_experts)


def local_experts(num_experts: int, world_size: int) -> int:
    """Experts whose parameters live (whole or in part) on one rank."""
    return max(1, num_experts // world_size)


@dataclass(frozen=True, kw_only=True)
class ExpertLayout:
    """Which slice of which expert this rank holds; pure arithmetic, no tensors."""

    num_experts: int
    model_dim: int
    hidden_dim: int
    world_size: int = 1
    rank: int = 0
    activation: str = "gelu"

    def __post_init__(self) -> None:
        for name in ("num_experts", "model_dim", "hidden_dim", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        E, W = self.num_experts, self.world_size
        if E >= W and E % W:
            raise ValueError(f"num_experts={E} must be a multiple of the world size {W} when E >= W")
        if E < W and W % E:
            raise ValueError(f"the world size {W} must be a multiple of num_experts={E} when E < W")
        s = self.shards_per_expert
        if self.hidden_dim % s:
            raise ValueError(f"hidden_dim={self.hidden_dim} must be divisible by W / E = {s}")
        if self.model_dim % s:
            raise ValueError(f"model_dim={self.model_dim} must be divisible by W / E = {s} (fc2 bias shards)")

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def shards_per_expert(self) -> int:
        return shards_per_expert(self.num_experts, self.world_size)

    @property
    def local_experts(self) -> int:
        return local_experts(self.num_experts, self.world_size)

    @property
    def hidden_shard(self) -> int:
        return self.hidden_dim // self.shards_per_expert

    @property
    def model_shard(self) -> int:
        return self.model_dim // self.shards_per_expert

    @property
    def first_expert(self) -> int:
        """Global index of this rank's first local expert."""
        if self.shards_per_expert > 1:
            return self.rank // self.shards_per_expert
        return self.rank * self.local_experts

    @property
    def shard_index(self) -> int:
        """Which of the s hidden slices of its expert this rank holds (0 when s == 1)."""
        return self.rank % self.shards_per_expert

    @property
    def valid_degrees(self) -> tuple[int, ...]:
        """Valid parallel degrees r: 0 (data parallel) and every divisor of s."""
        return (0, *divisors(self.shards_per_expert))

    def for_rank(self, rank: int) -> ExpertLayout:
        return ExpertLayout(
            num_experts=self.num_experts,
            model_dim=self.model_dim,
            hidden_dim=self.hidden_dim,
            world_size=self.world_size,
            rank=rank,
            activation=self.activation,
        )

    def metadata(self) -> dict:
        return {
            "num_experts": self.num_experts,
            "model_dim": self.model_dim,
            "hidden_dim": self.hidden_dim,
            "world_size": self.world_size,
            "activation": self.activation,
            "shards_per_expert": self.shards_per_expert,
        }

    # -- slicing full (single-process) tensors into this rank's shard --------------------------------
    @property
    def local_expert_ids(self) -> range:
        return range(self.first_expert, self.first_expert + self.local_experts)

    def shard_expert(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One whole expert (fc1_weight [M, X], fc1_bias [X], fc2_weight [H, M], fc2_bias [M]) -> this
        rank's slice of it (hidden columns shard_index, swiglu gate and up halves sliced alike)."""
        h, m, i = self.hidden_shard, self.model_shard, self.shard_index
        cols = slice(i * h, (i + 1) * h)

        def fc1_slice(t: torch.Tensor) -> torch.Tensor:
            if self.activation != "swiglu":
                return t[..., cols]
            gate, up = t.chunk(2, dim=-1)
            return torch.cat([gate[..., cols], up[..., cols]], dim=-1)

        return {
            "fc1_weight": fc1_slice(full["fc1_weight"]),
            "fc1_bias": fc1_slice(full["fc1_bias"]),
            "fc2_weight": full["fc2_weight"][cols],
            "fc2_bias": full["fc2_bias"][i * m : (i + 1) * m],
        }

    def shard(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Slice a full parameter dict ([E, ...] tensors keyed fc1_weight, fc1_bias, fc2_weight, fc2_bias)."""
        parts = [self.shard_expert({k: v[e] for k, v in full.items()}) for e in self.local_expert_ids]
        return {k: torch.stack([p[k] for p in parts]) for k in parts[0]}

    def unshard(self, shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Inverse of `shard` over all W ranks' shards (in rank order)."""
        assert len(shards) == self.world_size
        s = self.shards_per_expert
        by_expert = [shards[i : i + s] for i in range(0, self.world_size, s)]

        def join_hidden(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
            if self.activation == "swiglu" and dim == -1:
                halves = [p.chunk(2, dim=-1) for p in parts]
                return torch.cat(
                    [torch.cat([g for g, _ in halves], -1), torch.cat([u for _, u in halves], -1)], -1
                )
            return torch.cat(parts, dim=dim)

        out = {}
        for key, dim in (("fc1_weight", -1), ("fc1_bias", -1), ("fc2_weight", -2), ("fc2_bias", -1)):
            per_expert = [join_hidden([p[key] for p in group], dim) for group in by_expert]
            out[key] = torch.cat(per_expert, dim=0)
        return out
