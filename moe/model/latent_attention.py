"""Multi-head latent attention (DeepSeek-V2/V3): keys and values are up-projected from one
small latent per token, so a KV cache would hold the latent, not the heads.

Shape legend: B batch, S sequence, D model dim, H heads, L key/value latent width,
N per-head key/query part without positions, R rotary part, V value head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .attention import apply_rotary, yarn_mscale
from .config import LatentAttentionConfig, RopeScaling
from .norm import RMSNorm

# DeepSeek's code builds the latent RMSNorms with their default epsilon, whatever the
# model's rms_norm_eps; so do we, to compute what its checkpoints were trained with.
LATENT_NORM_EPS = 1e-6


def deinterleave(x: Tensor) -> Tensor:
    """Adjacent rotary pairs (x0, x1), (x2, x3), ... -> the half-split layout. Applied to
    queries and keys alike, it leaves every query-key product unchanged."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


class LatentAttention(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        mla: LatentAttentionConfig,
        rope_scaling: RopeScaling | None = None,
    ):
        super().__init__()
        self.n_heads, self.mla = n_heads, mla
        qk_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        if mla.q_lora_rank:
            self.q_down = nn.Linear(d_model, mla.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(mla.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_up = nn.Linear(mla.q_lora_rank, n_heads * qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(d_model, n_heads * qk_dim, bias=False)
        # One projection gives the latent and the rotary key (shared by all heads).
        self.kv_down = nn.Linear(d_model, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(mla.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_up = nn.Linear(
            mla.kv_lora_rank, n_heads * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(n_heads * mla.v_head_dim, d_model, bias=False)
        self.scale = qk_dim**-0.5
        if rope_scaling is not None and rope_scaling.kind == "yarn" and rope_scaling.mscale_all_dim:
            # DeepSeek's YaRN also sharpens the softmax, by the square of its temperature.
            self.scale *= yarn_mscale(rope_scaling.factor, rope_scaling.mscale_all_dim) ** 2

    def _query(self, x_BSD: Tensor) -> Tensor:
        if self.mla.q_lora_rank:
            return self.q_up(self.q_norm(self.q_down(x_BSD)))
        return self.q_proj(x_BSD)

    def forward(self, x_BSD: Tensor, cos_SR: Tensor, sin_SR: Tensor) -> Tensor:
        mla = self.mla
        q_BHSX = rearrange(self._query(x_BSD), "b s (h x) -> b h s x", h=self.n_heads)
        q_nope, q_rope = q_BHSX.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)

        latent_BSL, k_rope_BSR = self.kv_down(x_BSD).split(
            [mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1
        )
        kv = rearrange(self.kv_up(self.kv_norm(latent_BSL)), "b s (h x) -> b h s x", h=self.n_heads)
        k_nope, v_BHSV = kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=-1)
        k_rope = k_rope_BSR.unsqueeze(1)  # one rotary key per token, for every head
        if mla.rope_interleave:
            q_rope, k_rope = deinterleave(q_rope), deinterleave(k_rope)
        q_rope, k_rope = apply_rotary(q_rope, cos_SR, sin_SR), apply_rotary(k_rope, cos_SR, sin_SR)

        q_BHSX = torch.cat([q_nope, q_rope], dim=-1)
        k_BHSX = torch.cat([k_nope, k_rope.expand(-1, self.n_heads, -1, -1)], dim=-1)
        out = F.scaled_dot_product_attention(
            q_BHSX, k_BHSX, v_BHSV, is_causal=True, scale=self.scale
        )
        return self.o_proj(rearrange(out, "b h s v -> b s (h v)"))
