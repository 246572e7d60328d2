"""SwiGLU on CPUs where our kernels build (``cpu_activation.cpp``, in the same module as the
grouped GEMMs): ``silu(gate) * up`` over the two halves of ``h``, forward and backward one
pass each, in float32 between a bfloat16 or float32 input and an output of its dtype.

Shape legend: N rows, F hidden features, H = 2F.

Both the dense FFN and the experts take it (``moe.layers.ffn.activate``). Eager only:
inside a ``torch.compile`` trace PyTorch's operations run, which the compiler fuses itself.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import cpu_gemm


def usable(h_NH: Tensor) -> bool:
    """Whether this projection output can take our kernel (bfloat16 or float32 CPU rows)."""
    if torch.compiler.is_compiling() or h_NH.device.type != "cpu":
        return False
    return h_NH.dtype in (torch.bfloat16, torch.float32) and cpu_gemm.avx512_available()


def swiglu(h: Tensor) -> Tensor:
    """``silu(h[..., :F]) * h[..., F:]``, any leading dims."""
    a_NF = _SwiGLU.apply(h.reshape(-1, h.shape[-1]).contiguous())
    return a_NF if h.dim() == 2 else a_NF.view(*h.shape[:-1], -1)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_NH):
        ctx.save_for_backward(h_NH)
        return cpu_gemm.module().swiglu_forward(h_NH)

    @staticmethod
    @once_differentiable
    def backward(ctx, da_NF):
        (h_NH,) = ctx.saved_tensors
        return cpu_gemm.module().swiglu_backward(h_NH, da_NF.contiguous())
