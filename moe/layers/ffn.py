"""Feed-forward pieces shared by the dense FFN and the experts.

Shape legend: T tokens, D model dim, F hidden dim, H input-projection rows
(2F for SwiGLU: gate rows then up rows; F for ReLU/GELU).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from moe.kernels import cpu_activation

from .config import ACTIVATIONS


def projection_rows(activation: str, d_ff: int) -> int:
    """Rows of the input projection: SwiGLU needs a gate and an up projection."""
    return 2 * d_ff if activation == "swiglu" else d_ff


def activate(h_TH: Tensor, activation: str) -> Tensor:
    """[T, H] -> [T, F]: SwiGLU ``silu(gate) * up`` over the two halves, or ReLU/GELU.
    SwiGLU on the CPU in eager mode: our one-pass kernel (``moe.kernels.cpu_activation``),
    for the dense FFN and the experts alike."""
    if activation == "swiglu":
        if cpu_activation.usable(h_TH):
            return cpu_activation.swiglu(h_TH)
        gate_TF, up_TF = h_TH.chunk(2, dim=-1)
        return F.silu(gate_TF) * up_TF
    if activation == "relu":
        return F.relu(h_TH)
    if activation == "gelu":
        return F.gelu(h_TH)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def init_projection_(weight: Tensor, fan_in: int) -> Tensor:
    """``nn.Linear``'s default init, so experts start like a dense FFN of the same width."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(weight, -bound, bound)


class FeedForward(nn.Module):
    """Dense FFN, the MoE layer's baseline: ``w_out(act(w_in x))``, no biases."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu"):
        super().__init__()
        self.activation = activation
        self.w_in = nn.Linear(d_model, projection_rows(activation, d_ff), bias=False)
        self.w_out = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(activate(self.w_in(x), self.activation))
