"""Decoder-only transformer whose FFNs are MoE layers every ``moe_every`` blocks (but those in
``dense_blocks``), with grouped-query or multi-head latent attention.

Shape legend: B batch, S sequence, D model dim, V vocabulary.

Single-device code: parallelism is applied from outside (``moe.parallel``) by swapping the
MoE layers' dispatchers; nothing here touches ``torch.distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moe.layers import FeedForward, MoEAux, MoELayer

from .attention import Attention, rotary_tables
from .config import ModelConfig
from .latent_attention import LatentAttention
from .norm import RMSNorm

CHECKPOINTING = ("none", "full", "moe")


@dataclass
class ModelOutput:
    """logits [B, S, V]; aux_loss and z_loss summed over MoE layers (0 without MoE);
    moe: each MoE layer's ``MoEAux`` in block order."""

    logits: Tensor
    aux_loss: Tensor
    z_loss: Tensor
    moe: list[MoEAux] = field(default_factory=list)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        d = config.d_model
        self.attn_norm = RMSNorm(d, eps=config.norm_eps)
        if config.attention == "mla":
            self.attn = LatentAttention(d, config.n_heads, config.mla, config.rope_scaling)
        else:
            self.attn = Attention(
                d,
                config.n_heads,
                config.n_kv_heads,
                config.head_dim,
                config.qk_norm_scope,
                config.norm_eps,
                config.qkv_bias,
            )
        self.ffn_norm = RMSNorm(d, eps=config.norm_eps)
        self.is_moe = config.is_moe_block(index)
        self.ffn = MoELayer(d, config.moe) if self.is_moe else FeedForward(d, config.d_ff)
        self.checkpoint_ffn = False  # selective activation checkpointing of the MoE FFN

    def _ffn(self, h: Tensor, load_E: Tensor | None) -> tuple[Tensor, MoEAux | None]:
        if self.is_moe:
            return self.ffn(h, load_E)
        return self.ffn(h), None

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, load_E: Tensor | None = None
    ) -> tuple[Tensor, MoEAux | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        h = self.ffn_norm(x)
        if self.checkpoint_ffn and torch.is_grad_enabled():
            y, aux = checkpoint(self._ffn, h, load_E, use_reentrant=False)
        else:
            y, aux = self._ffn(h, load_E)
        return x + y, aux


class MoETransformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=config.init_std)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self.reset_rotary_tables()
        self.checkpointing = "none"

    def reset_rotary_tables(self) -> None:
        """(Re)compute the rotary cos/sin tables, e.g. after ``to_empty``."""
        cfg = self.config
        device = self.embed.weight.device
        cos, sin = rotary_tables(cfg.max_seq_len, cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def set_checkpointing(self, mode: str) -> None:
        """Activation checkpointing: ``none``, ``full`` (whole blocks) or ``moe`` (MoE FFNs)."""
        if mode not in CHECKPOINTING:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {mode!r}")
        self.checkpointing = mode
        for block in self.blocks:
            block.checkpoint_ffn = mode == "moe" and block.is_moe

    def forward(
        self, input_ids_BS: Tensor, expert_loads: list[Tensor] | None = None
    ) -> ModelOutput:
        """``expert_loads``: per MoE layer, token copies per expert over the last optimizer
        step's global batch (global load balancing; see ``MoEConfig.balance``)."""
        S = input_ids_BS.shape[1]
        if self.config.max_seq_len < S:
            limit = self.config.max_seq_len
            raise ValueError(f"sequence of {S} tokens exceeds model.max_seq_len ({limit})")
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        x = self.embed(input_ids_BS)
        auxes = []
        loads = iter(expert_loads or [])
        for block in self.blocks:
            load_E = next(loads, None) if block.is_moe else None
            if self.checkpointing == "full" and torch.is_grad_enabled():
                x, aux = checkpoint(block, x, cos, sin, load_E, use_reentrant=False)
            else:
                x, aux = block(x, cos, sin, load_E)
            if aux is not None:
                auxes.append(aux)
        logits = self.lm_head(self.norm(x))
        zero = logits.new_zeros((), dtype=torch.float32)
        aux_loss = sum((a.aux_loss for a in auxes), zero)
        z_loss = sum((a.z_loss for a in auxes), zero)
        return ModelOutput(logits, aux_loss, z_loss, auxes)

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters and those active for one token (top-k of each MoE layer's
        experts), of the whole model even when this process holds a slice of the experts."""
        expert_ids, experts_total, experts_active = set(), 0, 0
        for block in self.blocks:
            if block.is_moe:
                experts = block.ffn.experts
                per_expert = sum(p[0].numel() for p in experts.parameters())
                experts_total += per_expert * block.ffn.config.num_experts
                experts_active += per_expert * block.ffn.config.top_k
                expert_ids |= {id(p) for p in experts.parameters()}
        dense = sum(p.numel() for p in self.parameters() if id(p) not in expert_ids)
        return {"total": dense + experts_total, "active": dense + experts_active}

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 x active matmul parameters plus attention scores
        (``12 * layers * d_model * seq_len``, forward and backward), embeddings excluded
        as a lookup (the tied output projection counts)."""
        active = self.parameter_counts()["active"] - self.embed.weight.numel()
        active += self.lm_head.weight.numel()  # a matmul even when tied
        norms = sum(p.numel() for n, p in self.named_parameters() if "norm" in n)
        cfg = self.config
        return 6 * (active - norms) + 12 * cfg.n_layers * cfg.d_model * seq_len
