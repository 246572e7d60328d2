"""Grouped-query self-attention with rotary positions and optional QK-norm.

Shape legend: B batch, S sequence, D model dim, H query heads, G key/value heads,
C head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import RopeScaling
from .norm import RMSNorm


def rotary_tables(
    seq_len: int, head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[Tensor, Tensor]:
    """cos/sin tables [S, C] in the half-split layout (``transformers``' ``rotate_half``)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    scale = 1.0
    if scaling is not None and scaling.kind == "yarn":
        inv_freq, scale = _yarn(inv_freq, head_dim, theta, scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * scale, angles.sin() * scale


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(inv_freq: Tensor, dim: int, theta: float, s: RopeScaling) -> tuple[Tensor, float]:
    """YaRN: frequencies that turn fewer than ``beta_slow`` times over the original context
    are divided by ``factor``, those turning more than ``beta_fast`` times are kept, with a
    linear ramp between; returns them and the tables' scale."""

    def dimension(rotations: float) -> float:  # the dim pair that turns that many times
        turns = s.original_max_seq_len / (rotations * 2 * math.pi)
        return dim * math.log(turns) / (2 * math.log(theta))

    low, high = dimension(s.beta_fast), dimension(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / s.factor * ramp + inv_freq * (1 - ramp)
    if s.attention_factor is not None:
        return inv_freq, s.attention_factor
    if s.mscale and s.mscale_all_dim:
        return inv_freq, yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    return inv_freq, yarn_mscale(s.factor)


def apply_rotary(x_BHSC: Tensor, cos_SC: Tensor, sin_SC: Tensor) -> Tensor:
    first, second = x_BHSC.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x_BHSC * cos_SC + rotated * sin_SC).to(x_BHSC.dtype)


class Attention(nn.Module):
    """``qk_norm``: "head" normalizes each head's queries and keys (Qwen3), "projection" the
    whole query and key projections before the heads are split (OLMoE), "none" neither.
    ``qkv_bias``: biases on the query, key and value projections (Qwen2)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        qk_norm: str,
        eps: float,
        qkv_bias: bool = False,
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.qk_norm = qk_norm
        q_width, k_width = {
            "head": (head_dim, head_dim),
            "projection": (n_heads * head_dim, n_kv_heads * head_dim),
        }.get(qk_norm, (0, 0))
        self.q_norm = RMSNorm(q_width, eps=eps) if q_width else nn.Identity()
        self.k_norm = RMSNorm(k_width, eps=eps) if k_width else nn.Identity()

    def forward(self, x_BSD: Tensor, cos_SC: Tensor, sin_SC: Tensor) -> Tensor:
        q, k = self.q_proj(x_BSD), self.k_proj(x_BSD)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = rearrange(q, "b s (h c) -> b h s c", h=self.n_heads)
        k = rearrange(k, "b s (g c) -> b g s c", g=self.n_kv_heads)
        v = rearrange(self.v_proj(x_BSD), "b s (g c) -> b g s c", g=self.n_kv_heads)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos_SC, sin_SC), apply_rotary(k, cos_SC, sin_SC)
        if self.n_kv_heads != self.n_heads:  # explicit repeat: works on every SDPA backend
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(rearrange(out, "b h s c -> b s (h c)"))
