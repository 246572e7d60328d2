"""Permute token copies into expert order and unpermute them back, with autograd.

Shape legend: T tokens, K copies per token, N rows of the plan (T*K; the kept ones first), D
features.

- ``permute(x_TD, plan) -> x_ND``: row n is ``x[plan.row_token_N[n]]``, in the autocast
  dtype under autocast (what the experts' GEMM takes: cast once, while gathering).
  Backward sums each token's copies: ``dx[t] = sum_k dy[pos[t, k]]``.
- ``unpermute(y_ND, gates_TK, plan) -> y_TD``: ``y[t] = sum_k gates[t, k] * y[pos[t, k]]``
  over kept copies; ``y_ND`` holds every row of the plan or only the kept ones (after an
  all-to-all). Backward: ``dy[n] = gates[copy(n)] * dout[token(n)]`` and
  ``dgates[t, k] = <y[pos[t, k]], dout[t]>`` (0 for a dropped copy).

Both are gathers (no atomics), so results are deterministic on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu_rows, row_ops
from .backends import triton_available
from .dispatch_plan import DispatchPlan


def _row_impl(backend: str, *tensors: Tensor):
    """Triton row kernels for ``backend='triton'``; on the GPU PyTorch's gathers otherwise,
    ``auto`` included: on an H100 they beat our row kernels (benchmarks/results/). On a CPU
    with our kernels, ``cpu_rows`` for ``auto`` and ``avx512`` (eager)."""
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs triton and CUDA (or TRITON_INTERPRET=1)")
        from . import triton_rows

        return triton_rows
    if backend in ("auto", "avx512") and cpu_rows.usable(*tensors):
        return cpu_rows
    return row_ops


class Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: Tensor, plan: DispatchPlan, backend: str, dtype: torch.dtype) -> Tensor:
        ops = _row_impl(backend, x_TD)
        ctx.ops, ctx.x_dtype = ops, x_TD.dtype
        ctx.save_for_backward(plan.pos_TK)
        return ops.gather_rows(x_TD, plan.row_token_N, dtype=dtype)

    @staticmethod
    def backward(ctx, dy_ND: Tensor):
        (pos_TK,) = ctx.saved_tensors
        dx = ctx.ops.combine_rows(dy_ND.contiguous(), pos_TK, dtype=ctx.x_dtype)
        return dx, None, None, None


class Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND: Tensor, gates_TK: Tensor, plan: DispatchPlan, backend: str) -> Tensor:
        ops = _row_impl(backend, y_ND)
        ctx.ops = ops
        ctx.save_for_backward(y_ND, gates_TK, plan.row_token_N, plan.row_copy_N, plan.pos_TK)
        return ops.combine_rows(y_ND, plan.pos_TK, gates_TK)

    @staticmethod
    def backward(ctx, g_TD: Tensor):
        y_ND, gates_TK, row_token_N, row_copy_N, pos_TK = ctx.saved_tensors
        g_TD = g_TD.contiguous()
        dy = dgates = None
        if ctx.needs_input_grad[0]:
            n = y_ND.shape[0]  # all T*K rows, or the kept ones after an all-to-all
            scale_N = gates_TK.reshape(-1)[row_copy_N[:n]]
            dy = ctx.ops.gather_rows(g_TD, row_token_N[:n], scale_N, dtype=y_ND.dtype)
        if ctx.needs_input_grad[1]:
            dgates = ctx.ops.copy_dot_rows(y_ND, pos_TK, g_TD).to(gates_TK.dtype)
        return dy, dgates, None, None


def permute(x_TD: Tensor, plan: DispatchPlan, backend: str = "auto") -> Tensor:
    """Gather the kept token copies into expert order: [T, D] -> [N, D]."""
    dtype, device = x_TD.dtype, x_TD.device.type
    if dtype == torch.float32 and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    return Permute.apply(x_TD, plan, backend, dtype)


def unpermute(y_ND: Tensor, gates_TK: Tensor, plan: DispatchPlan, backend: str = "auto") -> Tensor:
    """Scatter expert outputs back to tokens, weighted by their gates: [N, D] -> [T, D]."""
    return Unpermute.apply(y_ND, gates_TK, plan, backend)
