"""Typed configuration of the decoder-only MoE language model."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe.layers import MoEConfig

# Fields that decide the shapes of the weights: a checkpoint only fits a model that agrees.
WEIGHT_SHAPE_FIELDS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "d_ff",
    "moe_every",
    "tie_embeddings",
    "qk_norm",
    "head_dim",
    "qkv_bias",
)
MOE_WEIGHT_SHAPE_FIELDS = (
    "num_experts",
    "d_ff",
    "activation",
    "expert_bias",
    "shared_d_ff",
    "shared_gate",
)


@dataclass
class ModelConfig:
    """Shape of the transformer. Shape letters used in the model code: B batch, S sequence,
    D ``d_model``, H heads, G key/value heads, C head dim, V vocabulary.

    vocab_size: tokenizer size (V).
    d_model: residual width (D).
    n_layers: transformer blocks.
    n_heads / n_kv_heads: query heads and key/value heads (grouped-query attention;
        ``n_kv_heads`` must divide ``n_heads``).
    d_ff: hidden width of the dense SwiGLU FFN in blocks without MoE.
    moe_every: blocks ``i`` with ``(i + 1) % moe_every == 0`` use an MoE FFN (1 = every
        block, 2 = every other block as in Switch; Qwen3-MoE's ``decoder_sparse_step``);
        0 = no MoE at all (the dense baseline).
    moe: the MoE layer's knobs.
    head_dim: width of one attention head (C); null: ``d_model / n_heads``.
    qk_norm: RMSNorm of queries and keys: true or "head" (each head's, Qwen3), "projection"
        (the whole projections before the heads are split, OLMoE), false or "none".
    tie_embeddings: share the input embedding with the output projection.
    rope_theta: rotary position base.
    max_seq_len: longest sequence the rotary table covers.
    norm_eps: RMSNorm epsilon.
    init_std: std of embeddings and the router; projections use ``nn.Linear``'s init.
    qkv_bias: biases on the query, key and value projections (Qwen2).
    hf_family: the Hugging Face family the weights came from (``init_from``), which
        ``moe-export format=hf`` writes back; null: Qwen3-MoE.
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 256
    moe_every: int = 1
    moe: MoEConfig = field(default_factory=MoEConfig)
    qk_norm: bool | str = True
    head_dim: int | None = None
    qkv_bias: bool = False
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    norm_eps: float = 1e-6
    init_std: float = 0.02
    hf_family: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        for name in (*WEIGHT_SHAPE_FIELDS[:6], "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), "
                    "or set head_dim"
                )
            self.head_dim = self.d_model // self.n_heads
        if self.qk_norm not in (True, False, "head", "projection", "none"):
            raise ValueError(
                f"qk_norm must be true, false, head, projection or none, got {self.qk_norm!r}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.head_dim < 1 or self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary positions, got {self.head_dim}")
        if self.moe_every < 0:
            raise ValueError(f"moe_every must be >= 0, got {self.moe_every}")

    @property
    def qk_norm_scope(self) -> str:
        """``qk_norm`` as one of head, projection, none."""
        return {True: "head", False: "none"}.get(self.qk_norm, self.qk_norm)

    def is_moe_block(self, index: int) -> bool:
        return self.moe_every > 0 and (index + 1) % self.moe_every == 0
