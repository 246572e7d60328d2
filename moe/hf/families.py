"""The open model families we read, each as two tables: its ``config.json`` in our
``ModelConfig`` terms, and its weight names on our parameters.

A weight name maps to a view of one of our tensors (an expert's gate rows are a slice of the
stacked ``w_in_EHD``), so one table serves reading and writing. An option a family uses that
our model does not represent is refused by name; nothing is approximated.

Families: ``qwen3_moe`` (per-head QK-norm, softmax top-k, optional renormalized gates, dense
blocks by ``decoder_sparse_step`` / ``mlp_only_layers``), ``qwen2_moe`` (the same routing, no
QK-norm, QKV biases, a shared expert behind a sigmoid gate), ``mixtral`` (no QK-norm,
renormalized top-k gates, ``block_sparse_moe`` with ``w1/w3/w2``), ``olmoe`` (QK-norm over
the whole projections), and the dense ``llama`` / ``qwen3`` (upcycling sources).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from moe.layers import MoEConfig
from moe.model import ModelConfig, MoETransformer


class UnsupportedModel(ValueError):
    """A family or an option of it that our model cannot represent exactly."""


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    qk_norm: str  # head | projection | none
    moe_prefix: str | None  # "mlp" or "block_sparse_moe"; None for dense families
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_experts: bool = False  # Qwen2-MoE: a gated shared expert, QKV biases
    renormalize: Callable[[dict], bool] = lambda hf: bool(hf.get("norm_topk_prob", False))


FAMILIES = {
    f.model_type: f
    for f in (
        Family("qwen3_moe", "Qwen3MoeForCausalLM", "head", "mlp"),
        Family("qwen2_moe", "Qwen2MoeForCausalLM", "none", "mlp", shared_experts=True),
        Family(
            "mixtral",
            "MixtralForCausalLM",
            "none",
            "block_sparse_moe",
            expert_names=("w1", "w3", "w2"),
            renormalize=lambda hf: True,
        ),
        Family("olmoe", "OlmoeForCausalLM", "projection", "mlp"),
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
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    checks = [
        (rope.get("rope_type", "default") != "default", f"rope type {rope.get('rope_type')!r}"),
        (hf.get("attention_bias") or hf.get("mlp_bias"), "attention or MLP biases"),
        (not family.shared_experts and hf.get("qkv_bias"), "QKV biases"),
        (hf.get("hidden_act", "silu") != "silu", f"hidden_act {hf.get('hidden_act')!r}"),
        (hf.get("use_sliding_window") or _sliding(hf), "sliding-window attention"),
        (hf.get("clip_qkv") is not None, f"clip_qkv={hf.get('clip_qkv')}"),
        (hf.get("router_jitter_noise", 0.0) > 0, "router jitter at inference"),
    ]
    return [what for bad, what in checks if bad]


def _sliding(hf: dict[str, Any]) -> bool:
    return hf.get("model_type") == "mixtral" and hf.get("sliding_window") is not None


def _moe_every(hf: dict[str, Any], family: Family, n_layers: int) -> int:
    """Our ``moe_every`` for the family's MoE/dense block pattern, or refuse the pattern."""
    if family.moe_prefix is None:
        return 0
    step = hf.get("decoder_sparse_step", 1) or 1
    dense = set(hf.get("mlp_only_layers") or [])
    moe_blocks = [i for i in range(n_layers) if (i + 1) % step == 0 and i not in dense]
    if not moe_blocks:  # every block dense (how a dense model of ours exports)
        return 0
    if moe_blocks != [i for i in range(n_layers) if (i + 1) % step == 0]:
        raise UnsupportedModel(
            f"mlp_only_layers={sorted(dense)}: a dense block where decoder_sparse_step={step} "
            "puts an MoE block is not supported"
        )
    return step


def model_config(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Our config for a Hugging Face ``config.json`` of a supported family."""
    family = family_of(hf, where)
    if problems := _problems(hf, family):
        raise UnsupportedModel(f"{where}: {family.model_type} with " + "; ".join(problems))
    n_layers = hf["num_hidden_layers"]
    rope = hf.get("rope_parameters") or {}
    moe = MoEConfig()
    if family.moe_prefix is not None:
        top_k = hf["num_experts_per_tok"]
        shared = hf.get("shared_expert_intermediate_size", 0) if family.shared_experts else 0
        moe = MoEConfig(
            num_experts=hf.get("num_local_experts") or hf["num_experts"],
            top_k=top_k,
            d_ff=hf.get("moe_intermediate_size") or hf["intermediate_size"],
            gate_mode="renormalize" if family.renormalize(hf) else "switch",
            shared_d_ff=shared,
            shared_gate=bool(shared),
        )
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=n_layers,
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        moe_every=_moe_every(hf, family, n_layers),
        moe=moe,
        qk_norm=family.qk_norm,
        qkv_bias=family.shared_experts and bool(hf.get("qkv_bias", True)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        hf_family=family.model_type if family.moe_prefix else None,
    )


def weight_table(model: MoETransformer, family: Family) -> dict[str, Tensor]:
    """The family's weight name -> a view of our tensor that holds it."""
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
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            table[p + f"self_attn.{name}.weight"] = getattr(block.attn, name).weight
        if cfg.qkv_bias:
            for name in ("q_proj", "k_proj", "v_proj"):
                table[p + f"self_attn.{name}.bias"] = getattr(block.attn, name).bias
        if cfg.qk_norm_scope != "none":
            table[p + "self_attn.q_norm.weight"] = block.attn.q_norm.weight
            table[p + "self_attn.k_norm.weight"] = block.attn.k_norm.weight
        if block.is_moe:
            moe = f"{p}{family.moe_prefix}."
            experts, F = block.ffn.experts, cfg.moe.d_ff
            table[moe + "gate.weight"] = block.ffn.router.weight_ED
            for j in range(cfg.moe.num_experts):
                e = f"{moe}experts.{j}."
                table[e + f"{gate_name}.weight"] = experts.w_in_EHD[j, :F]
                table[e + f"{up_name}.weight"] = experts.w_in_EHD[j, F:]
                table[e + f"{down_name}.weight"] = experts.w_out_EDF[j]
            if block.ffn.shared is not None:
                table.update(_swiglu(moe + "shared_expert.", block.ffn.shared))
            if block.ffn.shared_gate is not None:
                table[moe + "shared_expert_gate.weight"] = block.ffn.shared_gate.weight
        else:
            table.update(_swiglu(p + "mlp.", block.ffn))
    return table


def _swiglu(prefix: str, ffn) -> dict[str, Tensor]:
    """A dense SwiGLU FFN's three matrices (our ``w_in`` is gate rows then up rows)."""
    gate, up = ffn.w_in.weight.chunk(2, dim=0)
    return {
        prefix + "gate_proj.weight": gate,
        prefix + "up_proj.weight": up,
        prefix + "down_proj.weight": ffn.w_out.weight,
    }
