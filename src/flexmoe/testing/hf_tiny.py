"""Tiny random transformers MoE models for the integration tests (2 layers, hidden 16)."""

from __future__ import annotations

import torch

COMMON = dict(
    vocab_size=48,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)

TINY = {
    "mixtral": dict(intermediate_size=12, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=20,
        moe_intermediate_size=12,
        shared_expert_intermediate_size=10,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        intermediate_size=20, moe_intermediate_size=12, num_experts=4, num_experts_per_tok=2, head_dim=8
    ),
    "deepseek_v3": dict(
        intermediate_size=20,
        moe_intermediate_size=12,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        kv_lora_rank=8,
        q_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        routed_scaling_factor=2.5,
        num_key_value_heads=2,
    ),
    "olmoe": dict(intermediate_size=12, num_experts=4, num_experts_per_tok=2, eos_token_id=1, pad_token_id=0),
    "gpt_oss": dict(
        intermediate_size=12, num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=8
    ),
}


def tiny_config(name: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(name, **{**COMMON, **TINY[name], **overrides})


def tiny_model(name: str, *, seed: int = 0, dtype=torch.float64, implementation: str = "eager", **overrides):
    """The same weights for the same seed; router weights redrawn larger so routing is not near-uniform."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(name, **overrides), experts_implementation=implementation, dtype=dtype
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            # every parameter redrawn from one generator: identical in every process
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.2)
            if "norm" in pname:
                p.add_(1.0)
        for bname, b in model.named_buffers():
            if "e_score_correction_bias" in bname:
                b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float64).to(b.dtype) * 0.1)
    return model


def tiny_batch(vocab: int = 48, *, batch: int = 2, length: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    return ids
