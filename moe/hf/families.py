"""The open model families we read, each as two tables: its ``config.json`` in our
``ModelConfig`` terms, and its weight names on our parameters.

A weight name maps to a view of one of our tensors (an expert's gate rows are a slice of the
stacked ``w_in_EHD``), so one table serves reading and writing. An option a family uses that
our model does not represent is refused by name; nothing is approximated.

Families: ``qwen3_moe`` (per-head QK-norm, softmax top-k, optional renormalized gates, dense
blocks by ``decoder_sparse_step`` / ``mlp_only_layers``), ``qwen2_moe`` (the same routing, no
QK-norm, QKV biases, a shared expert behind a sigmoid gate), ``mixtral`` (no QK-norm,
renormalized top-k gates, ``block_sparse_moe`` with ``w1/w3/w2``), ``olmoe`` (QK-norm over
the whole projections), ``deepseek_v3`` (multi-head latent attention, sigmoid scores with a
selection bias, group-limited top-k, scaled gates, shared experts, leading dense blocks),
``dots1`` (dots.llm1: DeepSeek-V3's MoE on Qwen3's attention; our sigmoid-routed models
export to it), and the dense ``llama`` / ``qwen3`` (upcycling sources).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moe.layers import MoEConfig
from moe.model import ModelConfig, MoETransformer
from moe.model.config import LatentAttentionConfig, RopeScaling


class UnsupportedModel(ValueError):
    """A family or an option of it that our model cannot represent exactly."""


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    qk_norm: str  # head | projection | none
    moe_prefix: str | None  # "mlp" or "block_sparse_moe"; None for dense families
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_expert: str | None = None  # weight prefix of the shared expert(s), if any
    shared_gate: bool = False  # Qwen2-MoE's sigmoid gate on the shared expert
    qkv_bias: bool = False
    attention: str = "gqa"  # or "mla"
    score: str = "softmax"  # or "sigmoid" (with a selection bias, group-limited choice)
    # DeepSeek-V3 checkpoints carry multi-token-prediction layers after the last block,
    # which transformers' model skips as well.
    skips_extra_layers: bool = False
    renormalize: Callable[[dict], bool] = lambda hf: bool(hf.get("norm_topk_prob", False))


FAMILIES = {
    f.model_type: f
    for f in (
        Family("qwen3_moe", "Qwen3MoeForCausalLM", "head", "mlp"),
        Family(
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            "none",
            "mlp",
            shared_expert="shared_expert",
            shared_gate=True,
            qkv_bias=True,
        ),
        Family(
            "mixtral",
            "MixtralForCausalLM",
            "none",
            "block_sparse_moe",
            expert_names=("w1", "w3", "w2"),
            renormalize=lambda hf: True,
        ),
        Family("olmoe", "OlmoeForCausalLM", "projection", "mlp"),
        Family(
            "deepseek_v3",
            "DeepseekV3ForCausalLM",
            "none",
            "mlp",
            shared_expert="shared_experts",
            attention="mla",
            score="sigmoid",
            skips_extra_layers=True,
        ),
        Family(
            "dots1",
            "Dots1ForCausalLM",
            "head",
            "mlp",
            shared_expert="shared_experts",
            score="sigmoid",
        ),
        Family("llama", "LlamaForCausalLM", "none", None),
        Family("qwen3", "Qwen3ForCausalLM", "head", None),
    )
}


def family_of(hf: dict[str, Any], where: str = "config.json") -> Family:
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise UnsupportedModel(
            f"{where}: model_type {kind!r} is not supported; supported: {', '.join(FAMILIES)}"
        )
    return FAMILIES[kind]


def _problems(hf: dict[str, Any], family: Family) -> list[str]:
    kind = _rope_type(hf)
    checks = [
        (kind not in ("default", "yarn"), f"rope type {kind!r}"),
        (hf.get("attention_bias") or hf.get("mlp_bias"), "attention or MLP biases"),
        (not family.qkv_bias and hf.get("qkv_bias"), "QKV biases"),
        (hf.get("hidden_act", "silu") != "silu", f"hidden_act {hf.get('hidden_act')!r}"),
        (hf.get("use_sliding_window") or _sliding(hf), "sliding-window attention"),
        ("sliding_attention" in (hf.get("layer_types") or []), "sliding-window attention"),
        (hf.get("clip_qkv") is not None, f"clip_qkv={hf.get('clip_qkv')}"),
        (hf.get("router_jitter_noise", 0.0) > 0, "router jitter at inference"),
    ]
    if family.attention == "mla":
        heads, kv_heads = hf["num_attention_heads"], hf.get("num_key_value_heads")
        checks.append((kv_heads not in (None, heads), f"num_key_value_heads={kv_heads}"))
    return [what for bad, what in checks if bad]


def _sliding(hf: dict[str, Any]) -> bool:
    return hf.get("model_type") == "mixtral" and hf.get("sliding_window") is not None


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """``rope_parameters`` (transformers 5) or the older ``rope_scaling`` and ``rope_theta``."""
    return {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}


def _rope_type(hf: dict[str, Any]) -> str:
    rope = _rope(hf)
    return rope.get("rope_type") or rope.get("type") or "default"


def _rope_scaling(hf: dict[str, Any]) -> RopeScaling:
    if _rope_type(hf) != "yarn":
        return RopeScaling()
    rope = _rope(hf)
    original = rope["original_max_position_embeddings"]
    names = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor")
    optional = {name: float(rope[name]) for name in names if rope.get(name) is not None}
    if rope.get("truncate") is not None:
        optional["truncate"] = bool(rope["truncate"])
    return RopeScaling(
        kind="yarn",
        factor=float(rope.get("factor") or hf["max_position_embeddings"] / original),
        original_max_seq_len=original,
        **optional,
    )


def _moe_blocks(hf: dict[str, Any], family: Family, n_layers: int) -> dict[str, Any]:
    """Our ``moe_every`` and ``dense_blocks`` for the family's MoE/dense block pattern."""
    if family.moe_prefix is None:
        return dict(moe_every=0)
    step = hf.get("decoder_sparse_step", 1) or 1
    dense = set(hf.get("mlp_only_layers") or []) | set(range(hf.get("first_k_dense_replace", 0)))
    dense_blocks = sorted(i for i in dense if i < n_layers and (i + 1) % step == 0)
    if len(dense_blocks) == len(range(step - 1, n_layers, step)):
        return dict(moe_every=0)  # every block dense (how a dense model of ours exports)
    return dict(moe_every=step, dense_blocks=dense_blocks)


def _moe_config(hf: dict[str, Any], family: Family) -> MoEConfig:
    if family.moe_prefix is None:
        return MoEConfig()
    d_ff = hf.get("moe_intermediate_size") or hf["intermediate_size"]
    if family.score == "sigmoid":  # DeepSeek-V3's router (DeepSeek-V3, dots.llm1)
        shared = (hf.get("n_shared_experts") or 0) * d_ff
        routing = dict(
            score="sigmoid",
            n_group=hf.get("n_group") or 1,
            topk_group=hf.get("topk_group") or 1,
            gate_scale=float(hf.get("routed_scaling_factor", 1.0)),
            expert_bias=True,  # e_score_correction_bias
        )
    else:
        shared = hf.get("shared_expert_intermediate_size", 0) if family.shared_expert else 0
        routing = {}
    return MoEConfig(
        num_experts=hf.get("num_local_experts") or hf.get("n_routed_experts") or hf["num_experts"],
        top_k=hf["num_experts_per_tok"],
        d_ff=d_ff,
        gate_mode="renormalize" if family.renormalize(hf) else "switch",
        shared_d_ff=shared,
        shared_gate=family.shared_gate and bool(shared),
        **routing,
    )


def _attention(hf: dict[str, Any], family: Family) -> dict[str, Any]:
    heads = hf["num_attention_heads"]
    if family.attention == "mla":
        mla = LatentAttentionConfig(
            q_lora_rank=hf.get("q_lora_rank") or 0,
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            rope_interleave=bool(hf.get("rope_interleave", True)),
        )
        head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        return dict(attention="mla", mla=mla, n_kv_heads=heads, head_dim=head_dim)
    return dict(
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        qk_norm=family.qk_norm,
        qkv_bias=family.qkv_bias and bool(hf.get("qkv_bias", True)),
    )


def model_config(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Our config for a Hugging Face ``config.json`` of a supported family."""
    family = family_of(hf, where)
    if problems := _problems(hf, family):
        raise UnsupportedModel(f"{where}: {family.model_type} with " + "; ".join(problems))
    n_layers = hf["num_hidden_layers"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=n_layers,
        n_heads=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        moe=_moe_config(hf, family),
        **_moe_blocks(hf, family, n_layers),
        **_attention(hf, family),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=float(_rope(hf).get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling=_rope_scaling(hf),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        hf_family=family.model_type if family.moe_prefix else None,
    )


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
