"""Our model -> a Hugging Face directory of its family, loadable by ``transformers`` with no
custom code.

The family is the one the weights came from (``model.hf_family``, set by ``init_from``), or
Qwen3-MoE, which represents every model we train from scratch: RMSNorm, half-split rotary
positions, grouped-query attention with per-head QK-norm, SwiGLU experts, a softmax top-k
router with plain or renormalized gates, MoE every ``decoder_sparse_step`` blocks and dense
blocks in ``mlp_only_layers``; DeepSeek-V3 models (latent attention, sigmoid group-limited
routing) go back to DeepSeek-V3. Weight names come from ``moe.hf.weights`` (the table that
reads them). What the family cannot represent exactly is refused with the option to change,
before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from moe.hf.families import FAMILIES, Family
from moe.hf.weights import weight_table
from moe.layers import MoEConfig
from moe.model import ModelConfig, MoETransformer


class UnsupportedExport(ValueError):
    """The model uses an option that the target architecture cannot represent exactly."""


def target_family(cfg: ModelConfig) -> Family:
    """The source's family, else for our own models (Qwen3's attention): Qwen3-MoE for the
    softmax router, dots.llm1 (DeepSeek-V3's router on Qwen3's attention) for sigmoid."""
    if cfg.hf_family:
        return FAMILIES[cfg.hf_family]
    return FAMILIES["dots1" if cfg.moe.score == "sigmoid" else "qwen3_moe"]


def check_exportable(cfg: ModelConfig, family: Family) -> None:
    moe, name, has_moe = cfg.moe, family.architecture, cfg.has_moe
    deepseek = family.score == "sigmoid"
    problems = []
    if has_moe:
        problems += _routing_problems(moe, family)
    if moe.activation != "swiglu":
        problems.append(f"model.moe.activation={moe.activation}: {name} experts are SwiGLU")
    if cfg.attention != family.attention:
        problems.append(f"model.attention={cfg.attention}: {name} has {family.attention}")
    elif cfg.attention == "gqa" and cfg.qk_norm_scope != family.qk_norm:
        problems.append(f"model.qk_norm={cfg.qk_norm}: {name} has qk_norm={family.qk_norm}")
    if cfg.attention == "gqa" and cfg.qkv_bias != family.qkv_bias:
        problems.append(f"model.qkv_bias={cfg.qkv_bias}: {name} has qkv_bias={family.qkv_bias}")
    moe_blocks = [i for i in range(cfg.n_layers) if cfg.is_moe_block(i)]
    if family.model_type in ("mixtral", "olmoe") and len(moe_blocks) != cfg.n_layers:
        problems.append(f"model.moe_every / dense_blocks: every {name} block is MoE")
    if deepseek and moe_blocks != list(range(cfg.n_layers - len(moe_blocks), cfg.n_layers)):
        problems.append(f"model.moe_every / dense_blocks: {name} has dense blocks first, then MoE")
    if problems:
        raise UnsupportedExport("; ".join(problems))


def _routing_problems(moe: MoEConfig, family: Family) -> list[str]:
    name, deepseek = family.architecture, family.score == "sigmoid"
    problems = []
    if moe.capacity_factor > 0:
        problems.append(
            f"model.moe.capacity_factor={moe.capacity_factor} drops tokens, which {name} never "
            "does; train (or fine-tune) with model.moe.capacity_factor=0 (dropless)"
        )
    if moe.score != family.score:
        problems.append(f"model.moe.score={moe.score}: {name} has {family.score} scores")
    if moe.expert_bias != deepseek:
        problems.append(
            f"model.moe.expert_bias={str(moe.expert_bias).lower()}: {name} "
            + ("always has" if deepseek else "cannot express")
            + f" a selection bias; train with model.moe.expert_bias={str(deepseek).lower()}"
        )
    if not deepseek and moe.gate_scale != 1.0:
        problems.append(
            f"model.moe.gate_scale={moe.gate_scale} scales the routed output, which {name} "
            "cannot express; train with model.moe.gate_scale=1"
        )
    if not deepseek and moe.n_group > 1:
        problems.append(f"model.moe.n_group={moe.n_group}: {name} has no group-limited routing")
    if bool(moe.shared_d_ff) != bool(family.shared_expert) and not deepseek:
        problems.append(f"model.moe.shared_d_ff={moe.shared_d_ff}: {name} shared experts differ")
    if deepseek and moe.shared_d_ff % moe.d_ff:
        problems.append(
            f"model.moe.shared_d_ff={moe.shared_d_ff}: {name} shares whole experts "
            f"(a multiple of model.moe.d_ff={moe.d_ff})"
        )
    if moe.shared_d_ff and moe.shared_gate != family.shared_gate:
        problems.append(f"model.moe.shared_gate={moe.shared_gate}: {name} differs")
    if family.model_type == "mixtral" and moe.gate_mode != "renormalize":
        problems.append(f"model.moe.gate_mode={moe.gate_mode}: {name} renormalizes its gates")
    return problems


def hf_config_fields(cfg: ModelConfig, family: Family) -> dict:
    moe_layers = [i for i in range(cfg.n_layers) if cfg.is_moe_block(i)]
    fields = dict(
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
        rope_parameters=rope_parameters(cfg),
        num_experts_per_tok=cfg.moe.top_k,
    )
    moe = cfg.moe
    if family.model_type in ("qwen2_moe", "qwen3_moe"):
        fields.update(
            decoder_sparse_step=max(cfg.moe_every, 1),
            moe_intermediate_size=moe.d_ff,
            num_experts=moe.num_experts,
            norm_topk_prob=moe.gate_mode == "renormalize",
            mlp_only_layers=[i for i in range(cfg.n_layers) if i not in moe_layers],
        )
        if family.shared_expert:  # Qwen2-MoE
            fields.update(shared_expert_intermediate_size=moe.shared_d_ff, qkv_bias=True)
        else:
            fields.update(attention_bias=False)
    elif family.model_type == "mixtral":
        fields.update(intermediate_size=moe.d_ff, num_local_experts=moe.num_experts)
    elif family.score == "sigmoid":  # DeepSeek-V3's router: DeepSeek-V3 and dots.llm1
        fields.update(
            moe_intermediate_size=moe.d_ff,
            n_routed_experts=moe.num_experts,
            n_shared_experts=moe.shared_d_ff // moe.d_ff,
            routed_scaling_factor=moe.gate_scale,
            n_group=moe.n_group,
            topk_group=moe.topk_group,
            norm_topk_prob=moe.gate_mode == "renormalize",
            first_k_dense_replace=cfg.n_layers - len(moe_layers),
            attention_bias=False,
        )
        if family.attention == "mla":
            mla = cfg.mla
            del fields["head_dim"]  # the config derives it (the rotary part)
            fields.update(
                num_key_value_heads=cfg.n_heads,
                q_lora_rank=mla.q_lora_rank or None,
                kv_lora_rank=mla.kv_lora_rank,
                qk_nope_head_dim=mla.qk_nope_head_dim,
                qk_rope_head_dim=mla.qk_rope_head_dim,
                v_head_dim=mla.v_head_dim,
                rope_interleave=mla.rope_interleave,
            )
        else:  # dots.llm1: Qwen3's attention, every block full (no sliding window)
            fields.update(sliding_window=None)
    else:  # olmoe
        fields.update(
            intermediate_size=moe.d_ff,
            num_experts=moe.num_experts,
            norm_topk_prob=moe.gate_mode == "renormalize",
        )
    return fields


def rope_parameters(cfg: ModelConfig) -> dict:
    scaling = cfg.rope_scaling
    if scaling.kind == "none":
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    fields = {
        "rope_type": "yarn",
        "rope_theta": cfg.rope_theta,
        "factor": scaling.factor,
        "original_max_position_embeddings": scaling.original_max_seq_len,
        "beta_fast": scaling.beta_fast,
        "beta_slow": scaling.beta_slow,
        "mscale": scaling.mscale,
        "mscale_all_dim": scaling.mscale_all_dim,
        "truncate": scaling.truncate,
    }
    if scaling.attention_factor is not None:
        fields["attention_factor"] = scaling.attention_factor
    return fields


def hf_weights(model: MoETransformer) -> dict[str, torch.Tensor]:
    """The family's weight name -> a view of our tensor (nothing copied)."""
    table = weight_table(model, target_family(model.config))
    if any(t is None for t in table.values()):
        raise UnsupportedExport(
            "this model holds a slice of the experts (expert parallelism); export its "
            "checkpoint, which moe-export reads whole"
        )
    return table


def save_weights(
    weights: dict[str, torch.Tensor], out: Path, dtype: torch.dtype, max_shard_bytes: int
) -> list[str]:
    """Safetensors files of at most ``max_shard_bytes`` each (plus the index that names each
    tensor's file when there are several), converting one shard at a time to ``dtype``, so
    that no second copy of the whole model is ever held. Returns the file names."""
    from huggingface_hub import split_torch_state_dict_into_shards

    sizes = {n: torch.empty(t.shape, dtype=dtype, device="meta") for n, t in weights.items()}
    split = split_torch_state_dict_into_shards(
        sizes, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_bytes
    )
    for filename, names in split.filename_to_tensors.items():
        shard = {n: weights[n].detach().to("cpu", dtype).contiguous() for n in names}
        save_file(shard, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return list(split.filename_to_tensors)


def export_hf(
    model: MoETransformer,
    tokenizer: Tokenizer,
    out: Path,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = 5 * 10**9,
) -> Path:
    """Write a directory that ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``
    load with no custom code: config, safetensors weights (in ``dtype``, sharded as
    ``transformers`` shards), tokenizer files."""
    from transformers import AutoConfig, PreTrainedTokenizerFast

    family = target_family(model.config)
    check_exportable(model.config, family)
    weights = hf_weights(model)
    config = AutoConfig.for_model(family.model_type, **hf_config_fields(model.config, family))
    config.architectures = [family.architecture]
    config.dtype = dtype
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_weights(weights, out, dtype, max_shard_bytes)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(out)
    return out
