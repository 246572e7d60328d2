"""The open model families we read, and each one's ``config.json`` in our ``ModelConfig``
terms (its weight names are in ``moe.hf.weights``). An option a family uses that our model
does not represent is refused by name; nothing is approximated.

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

from moe.layers import MoEConfig
from moe.model import ModelConfig
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
