"""Our model <-> ``transformers``' Qwen3-MoE, which represents it exactly.

Qwen3-MoE has our pieces: RMSNorm, rotary positions (half-split), grouped-query attention
with per-head QK RMSNorm, SwiGLU experts with a fused ``gate_up_proj [E, 2F, D]`` and
``down_proj [E, D, F]``, a softmax top-k router with unnormalized (``norm_topk_prob=False``)
or renormalized gates, MoE every ``decoder_sparse_step`` blocks (the same ``(i + 1) % n``
rule), and dense blocks listed in ``mlp_only_layers``. What it cannot represent is refused
with the option to change.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from moe.model import ModelConfig, MoETransformer


class UnsupportedExport(ValueError):
    """The model uses an option that the target architecture cannot represent exactly."""


def check_exportable(cfg: ModelConfig) -> None:
    moe = cfg.moe
    problems = []
    if cfg.moe_every > 0 and moe.capacity_factor > 0:
        problems.append(
            f"model.moe.capacity_factor={moe.capacity_factor} drops tokens, which Qwen3-MoE "
            "never does; train (or fine-tune) with model.moe.capacity_factor=0 (dropless)"
        )
    if cfg.moe_every > 0 and moe.expert_bias:
        problems.append(
            "model.moe.expert_bias=true shifts expert selection, which Qwen3-MoE "
            "cannot express; train with model.moe.expert_bias=false"
        )
    if cfg.moe_every > 0 and moe.gate_scale != 1.0:
        problems.append(
            f"model.moe.gate_scale={moe.gate_scale} scales the routed output, which Qwen3-MoE "
            "cannot express; train with model.moe.gate_scale=1"
        )
    if moe.activation != "swiglu":
        problems.append(f"model.moe.activation={moe.activation}: Qwen3-MoE experts are SwiGLU")
    if cfg.qk_norm_scope != "head":
        problems.append(
            f"model.qk_norm={cfg.qk_norm}: Qwen3-MoE normalizes each head's queries and keys"
        )
    if problems:
        raise UnsupportedExport("; ".join(problems))


def hf_config(cfg: ModelConfig):
    from transformers import Qwen3MoeConfig

    check_exportable(cfg)
    moe_layers = [i for i in range(cfg.n_layers) if cfg.is_moe_block(i)]
    return Qwen3MoeConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        decoder_sparse_step=max(cfg.moe_every, 1),
        moe_intermediate_size=cfg.moe.d_ff,
        num_experts=cfg.moe.num_experts,
        num_experts_per_tok=cfg.moe.top_k,
        norm_topk_prob=cfg.moe.gate_mode == "renormalize",
        mlp_only_layers=[i for i in range(cfg.n_layers) if i not in moe_layers],
        attention_bias=False,
    )


def hf_tensors(model: MoETransformer) -> dict[str, torch.Tensor]:
    """Qwen3-MoE name -> our tensor (views into our parameters, so the same table serves
    export and import). A dense SwiGLU ``w_in`` is gate rows then up rows."""
    table = {
        "model.embed_tokens.weight": model.embed.weight,
        "model.norm.weight": model.norm.weight,
    }
    if not model.config.tie_embeddings:
        table["lm_head.weight"] = model.lm_head.weight
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        table[p + "input_layernorm.weight"] = block.attn_norm.weight
        table[p + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            table[p + f"self_attn.{name}.weight"] = getattr(block.attn, name).weight
        if model.config.qk_norm_scope != "none":  # Llama has none; Qwen3 has them
            table[p + "self_attn.q_norm.weight"] = block.attn.q_norm.weight
            table[p + "self_attn.k_norm.weight"] = block.attn.k_norm.weight
        if block.is_moe:
            table[p + "mlp.gate.weight"] = block.ffn.router.weight_ED
            table[p + "mlp.experts.gate_up_proj"] = block.ffn.experts.w_in_EHD
            table[p + "mlp.experts.down_proj"] = block.ffn.experts.w_out_EDF
        else:
            gate, up = block.ffn.w_in.weight.chunk(2, dim=0)
            table[p + "mlp.gate_proj.weight"] = gate
            table[p + "mlp.up_proj.weight"] = up
            table[p + "mlp.down_proj.weight"] = block.ffn.w_out.weight
    return table


def to_hf_state_dict(model: MoETransformer) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in hf_tensors(model).items()}


@torch.no_grad()
def from_hf_state_dict(model: MoETransformer, state: dict[str, torch.Tensor]) -> None:
    """Load Qwen3-MoE-named weights into our model (shapes must match)."""
    for name, target in hf_tensors(model).items():
        if name not in state:
            raise KeyError(f"no weight named {name} in the Hugging Face state dict")
        target.copy_(state[name])


def export_hf(model: MoETransformer, tokenizer: Tokenizer, out: Path) -> Path:
    """Write a directory that ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``
    load with no custom code: config, safetensors weights, tokenizer files."""
    from transformers import PreTrainedTokenizerFast, Qwen3MoeForCausalLM

    config = hf_config(model.config)
    hf = Qwen3MoeForCausalLM(config).to(torch.float32)
    result = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    missing = [
        k for k in result.missing_keys if not (config.tie_word_embeddings and "lm_head" in k)
    ]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"weight mapping mismatch: missing {missing}, unexpected {result.unexpected_keys}"
        )
    if config.tie_word_embeddings:
        hf.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out, safe_serialization=True)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(out)
    return out
