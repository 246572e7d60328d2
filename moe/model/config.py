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
    "dense_blocks",
    "attention",
    "mla",
)
MOE_WEIGHT_SHAPE_FIELDS = (
    "num_experts",
    "d_ff",
    "activation",
    "expert_bias",
    "shared_d_ff",
    "shared_gate",
)


ATTENTIONS = ("gqa", "mla")


@dataclass
class RopeScaling:
    """Rotary positions stretched beyond the pre-training context (YaRN, Peng et al. 2023;
    the ``rope_scaling`` of DeepSeek-V3 and long-context Qwen checkpoints).

    kind: "none" or "yarn".
    factor: how many times longer than ``original_max_seq_len`` the context becomes.
    original_max_seq_len: the context the model was pre-trained with.
    beta_fast / beta_slow: rotations bounding the ramp between frequencies kept as they are
        (fast) and frequencies divided by ``factor`` (slow).
    mscale / mscale_all_dim: YaRN's temperature terms: the rotary tables are scaled by
        ``m(mscale) / m(mscale_all_dim)`` (``m(x) = 0.1 x ln(factor) + 1``; ``m(1)`` when
        ``mscale_all_dim`` is 0), and latent attention's softmax by ``m(mscale_all_dim)^2``.
    attention_factor: the rotary tables' scale, given directly (overrides the mscales).
    truncate: round the ramp's ends to whole dimensions.
    """

    kind: str = "none"
    factor: float = 1.0
    original_max_seq_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("none", "yarn"):
            raise ValueError(f"kind must be none or yarn, got {self.kind!r}")
        if self.factor < 1 or self.original_max_seq_len < 1:
            raise ValueError("factor must be >= 1 and original_max_seq_len >= 1")


@dataclass
class LatentAttentionConfig:
    """Multi-head latent attention (DeepSeek-V2/V3; ``model.attention=mla``). Keys and values
    come from one low-rank latent per token; each head's query and key are a part without
    positions (``qk_nope_head_dim``) and a rotary part (``qk_rope_head_dim``), the rotary
    key being one per token, shared by all heads.

    q_lora_rank: rank of the query's low-rank path (down-projection, RMSNorm, up-projection);
        0 = one full-rank query projection.
    kv_lora_rank: width of the key/value latent (after its RMSNorm, up-projected per head).
    qk_nope_head_dim / qk_rope_head_dim: the two parts of a query/key head.
    v_head_dim: width of a value head.
    rope_interleave: rotary pairs are adjacent dims (DeepSeek's checkpoints) instead of the
        two halves of the rotary part.
    """

    q_lora_rank: int = 0
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_interleave: bool = False

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.q_lora_rank < 0 or self.qk_rope_head_dim % 2:
            raise ValueError("q_lora_rank must be >= 0 and qk_rope_head_dim even")


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
    dense_blocks: indices of blocks that keep the dense FFN whatever ``moe_every`` says
        (DeepSeek-V3's leading dense blocks, Qwen's ``mlp_only_layers``); with
        ``moe_every`` any MoE/dense pattern.
    moe: the MoE layer's knobs.
    attention: "gqa" (grouped-query attention, the keys below) or "mla" (multi-head latent
        attention, DeepSeek-V3; its shape is ``mla``, and ``n_kv_heads``, ``head_dim``,
        ``qk_norm`` and ``qkv_bias`` do not apply).
    mla: the latent attention's shape (``attention=mla``).
    head_dim: width of one attention head (C); null: ``d_model / n_heads``.
    qk_norm: RMSNorm of queries and keys: true or "head" (each head's, Qwen3), "projection"
        (the whole projections before the heads are split, OLMoE), false or "none".
    tie_embeddings: share the input embedding with the output projection.
    rope_theta: rotary position base.
    rope_scaling: rotary positions stretched beyond the pre-training context (YaRN).
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
    dense_blocks: list[int] = field(default_factory=list)
    moe: MoEConfig = field(default_factory=MoEConfig)
    attention: str = "gqa"
    mla: LatentAttentionConfig = field(default_factory=LatentAttentionConfig)
    qk_norm: bool | str = True
    head_dim: int | None = None
    qkv_bias: bool = False
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_seq_len: int = 2048
    norm_eps: float = 1e-6
    init_std: float = 0.02
    hf_family: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if isinstance(self.mla, dict):
            self.mla = LatentAttentionConfig(**self.mla)
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if any(not 0 <= i < self.n_layers for i in self.dense_blocks):
            raise ValueError(
                f"dense_blocks must be block indices in [0, {self.n_layers}), "
                f"got {self.dense_blocks}"
            )
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
        if self.attention == "gqa" and (self.head_dim < 1 or self.head_dim % 2):
            raise ValueError(f"head_dim must be even for rotary positions, got {self.head_dim}")
        if self.moe_every < 0:
            raise ValueError(f"moe_every must be >= 0, got {self.moe_every}")

    @property
    def qk_norm_scope(self) -> str:
        """``qk_norm`` as one of head, projection, none."""
        return {True: "head", False: "none"}.get(self.qk_norm, self.qk_norm)

    @property
    def rotary_dim(self) -> int:
        """Width of the rotary part of a query/key head."""
        return self.mla.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    def is_moe_block(self, index: int) -> bool:
        every = self.moe_every > 0 and (index + 1) % self.moe_every == 0
        return every and index not in self.dense_blocks

    @property
    def has_moe(self) -> bool:
        return any(self.is_moe_block(i) for i in range(self.n_layers))
