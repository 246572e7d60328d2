"""Grouped GEMM with autograd over interchangeable backends.

Shape legend: N rows in expert order, E experts, K inner dim, P output dim.

``grouped_mm(x_NK, w_EKP, offsets_E)`` multiplies each expert's group of rows by that
expert's matrix. Backward: ``dx = grouped_mm(dy, w^T)`` and ``dw[e] = x[g]^T dy[g]``.
When ``w`` is a transposed view of a contiguous ``[E, P, K]`` weight (the
``nn.Linear``/Hugging Face layout), the weight gradient is computed as ``dy^T x`` so that
it comes out in the parameter's own layout and autograd needs no extra copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import resolve_backend


class GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NK: Tensor, w_EKP: Tensor, offsets_E: Tensor, backend: str) -> Tensor:
        impl = resolve_backend(backend, x_NK, w_EKP)
        ctx.impl = impl
        ctx.save_for_backward(x_NK, w_EKP, offsets_E)
        return impl.gmm(x_NK, w_EKP, offsets_E)

    @staticmethod
    def backward(ctx, dy_NP: Tensor):
        x_NK, w_EKP, offsets_E = ctx.saved_tensors
        impl = ctx.impl
        dy_NP = dy_NP.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = impl.gmm(dy_NP, w_EKP.transpose(1, 2), offsets_E)
        if ctx.needs_input_grad[1]:
            if w_EKP.transpose(1, 2).is_contiguous() and not w_EKP.is_contiguous():
                dw = impl.gmm_wgrad(dy_NP, x_NK, offsets_E).transpose(1, 2)
            else:
                dw = impl.gmm_wgrad(x_NK, dy_NP, offsets_E)
        return dx, dw, None, None


def grouped_mm(x_NK: Tensor, w_EKP: Tensor, offsets_E: Tensor, backend: str = "auto") -> Tensor:
    """``y[g] = x[g] @ w[e]`` for each expert e's rows ``offsets[e-1]:offsets[e]``.

    x_NK: [N, K]; w_EKP: [E, K, P] (a transposed view is fine); offsets_E: [E] int32
    cumulative group ends with ``offsets[-1] == N``. Returns [N, P]. Under autocast the
    operands are cast to the autocast dtype, as ``torch.mm`` would be.
    """
    if x_NK.dim() != 2 or w_EKP.dim() != 3 or x_NK.shape[1] != w_EKP.shape[1]:
        raise ValueError(
            f"grouped_mm needs x [N, K] and w [E, K, P]; got {tuple(x_NK.shape)} "
            f"and {tuple(w_EKP.shape)}"
        )
    if offsets_E.shape != (w_EKP.shape[0],):
        raise ValueError(f"offsets must have one entry per expert ({w_EKP.shape[0]})")
    device_type = x_NK.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x_NK, w_EKP = x_NK.to(dtype), w_EKP.to(dtype)
    if x_NK.dtype != w_EKP.dtype:
        raise ValueError(f"grouped_mm operands differ in dtype: {x_NK.dtype} vs {w_EKP.dtype}")
    return GroupedMM.apply(x_NK, w_EKP, offsets_E.to(torch.int32), backend)
