"""Each family's weight names, as views of our tensors: one table serves reading a Hugging
Face checkpoint into our model and writing our model out as one.

An expert's gate rows are a slice of the stacked ``w_in_EHD``; under expert parallelism the
experts of other ranks map to None (their tensors are skipped when reading).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe.model import ModelConfig, MoETransformer

from .families import Family


def weight_table(model: MoETransformer, family: Family) -> dict[str, Tensor | None]:
    """The family's weight name -> a view of our tensor that holds it; None for the experts
    of another expert-parallel rank."""
    cfg = model.config
    table = {
        "model.embed_tokens.weight": model.embed.weight,
        "model.norm.weight": model.norm.weight,
    }
    if not cfg.tie_embeddings:
        table["lm_head.weight"] = model.lm_head.weight
    gate_name, up_name, down_name = family.expert_names
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        table[p + "input_layernorm.weight"] = block.attn_norm.weight
        table[p + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        table.update(_attention_weights(p + "self_attn.", block.attn, cfg))
        if block.is_moe:
            moe = f"{p}{family.moe_prefix}."
            experts, F = block.ffn.experts, cfg.moe.d_ff
            table[moe + "gate.weight"] = block.ffn.router.weight_ED
            if cfg.moe.expert_bias:
                table[moe + "gate.e_score_correction_bias"] = block.ffn.router.expert_bias_E
            for j in range(cfg.moe.num_experts):
                e, local = f"{moe}experts.{j}.", j - experts.first_expert
                held = 0 <= local < experts.num_experts  # under expert parallelism, a slice
                table[e + f"{gate_name}.weight"] = experts.w_in_EHD[local, :F] if held else None
                table[e + f"{up_name}.weight"] = experts.w_in_EHD[local, F:] if held else None
                table[e + f"{down_name}.weight"] = experts.w_out_EDF[local] if held else None
            if block.ffn.shared is not None:
                table.update(_swiglu(f"{moe}{family.shared_expert}.", block.ffn.shared))
            elif family.score == "sigmoid":  # DeepSeek-style models keep zero-width ones
                table.update(_empty_swiglu(f"{moe}{family.shared_expert}.", cfg.d_model))
            if block.ffn.shared_gate is not None:
                table[moe + "shared_expert_gate.weight"] = block.ffn.shared_gate.weight
        else:
            table.update(_swiglu(p + "mlp.", block.ffn))
    return table


def _attention_weights(prefix: str, attn, cfg: ModelConfig) -> dict[str, Tensor]:
    if cfg.attention == "mla":
        names = {"kv_a_proj_with_mqa": attn.kv_down, "kv_b_proj": attn.kv_up, "o_proj": attn.o_proj}
        if cfg.mla.q_lora_rank:
            names.update(q_a_proj=attn.q_down, q_b_proj=attn.q_up)
        else:
            names.update(q_proj=attn.q_proj)
        table = {f"{prefix}{name}.weight": linear.weight for name, linear in names.items()}
        table[prefix + "kv_a_layernorm.weight"] = attn.kv_norm.weight
        if cfg.mla.q_lora_rank:
            table[prefix + "q_a_layernorm.weight"] = attn.q_norm.weight
        return table
    table = {
        f"{prefix}{name}.weight": getattr(attn, name).weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    if cfg.qkv_bias:
        table.update(
            {f"{prefix}{n}.bias": getattr(attn, n).bias for n in ("q_proj", "k_proj", "v_proj")}
        )
    if cfg.qk_norm_scope != "none":
        table[prefix + "q_norm.weight"] = attn.q_norm.weight
        table[prefix + "k_norm.weight"] = attn.k_norm.weight
    return table


def _empty_swiglu(prefix: str, d_model: int) -> dict[str, Tensor]:
    """The zero-width shared expert of a DeepSeek-style checkpoint with n_shared_experts=0."""
    shapes = {"gate_proj": (0, d_model), "up_proj": (0, d_model), "down_proj": (d_model, 0)}
    return {f"{prefix}{name}.weight": torch.empty(shape) for name, shape in shapes.items()}


def _swiglu(prefix: str, ffn) -> dict[str, Tensor]:
    """A dense SwiGLU FFN's three matrices (our ``w_in`` is gate rows then up rows)."""
    gate, up = ffn.w_in.weight.chunk(2, dim=0)
    return {
        prefix + "gate_proj.weight": gate,
        prefix + "up_proj.weight": up,
        prefix + "down_proj.weight": ffn.w_out.weight,
    }
