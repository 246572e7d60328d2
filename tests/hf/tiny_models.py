"""Tiny random models of every family we read, built locally with ``transformers`` from
their config classes (nothing from a hub)."""

import torch
import transformers

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

FAMILIES = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=12, head_dim=12),
    ),
    "qwen3_moe_renormalized_sparse_step_2": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_experts=5,
            num_experts_per_tok=3,
            moe_intermediate_size=8,
            norm_topk_prob=True,
            decoder_sparse_step=2,
            tie_word_embeddings=True,
        ),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=12,
            shared_expert_intermediate_size=20,
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=2),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(num_experts=8, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1),
    ),
    # Latent attention with a low-rank query, a leading dense block, sigmoid scores in 4
    # groups of which 2 are chosen, shared experts, scaled renormalized gates.
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            num_key_value_heads=4,
            n_routed_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=12,
            n_shared_experts=2,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            q_lora_rank=16,
            kv_lora_rank=8,
            qk_nope_head_dim=6,
            qk_rope_head_dim=4,
            v_head_dim=5,
        ),
    ),
    # YaRN (as DeepSeek-V3's release): stretched rotary tables and a sharper softmax.
    "deepseek_v3_yarn": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            num_key_value_heads=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=8,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=12,
            kv_lora_rank=8,
            qk_nope_head_dim=4,
            qk_rope_head_dim=8,
            v_head_dim=4,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=16,
                beta_fast=32,
                beta_slow=1,
                mscale=1.0,
                mscale_all_dim=0.8,
            ),
        ),
    ),
    "qwen3_moe_yarn": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=12,
            rope_parameters=dict(
                rope_type="yarn", rope_theta=1000.0, factor=2.0, original_max_position_embeddings=32
            ),
        ),
    ),
    # dots.llm1: DeepSeek-V3's router and shared experts on Qwen3's attention.
    "dots1": (
        "Dots1Config",
        "Dots1ForCausalLM",
        dict(
            head_dim=12,
            n_routed_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=12,  # transformers' grouped_mm wants 16-byte rows
            n_shared_experts=1,
            n_group=3,
            topk_group=2,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            routed_scaling_factor=1.5,
            sliding_window=None,
        ),
    ),
    "deepseek_v3_full_rank_query_half_split_rope": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            num_key_value_heads=4,
            n_routed_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=8,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=0,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            q_lora_rank=None,
            kv_lora_rank=10,
            qk_nope_head_dim=4,
            qk_rope_head_dim=6,
            v_head_dim=7,
            rope_interleave=False,
        ),
    ),
}


def save_tiny(kind, directory, seed=0):
    config_cls, model_cls, extra = FAMILIES[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    hf = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():  # norms away from 1, so that a missed norm weight shows
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "self_attn" in name:  # sharp attention, so that positions (rotary) matter
                p.mul_(4.0)
        for name, b in hf.named_buffers():  # a selection bias that changes choices
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)
    hf.save_pretrained(directory)
    return hf
