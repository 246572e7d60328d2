"""Permute token copies into expert order and unpermute them back, with autograd.

Shape legend: T tokens, K copies per token, N rows of the plan (T*K; the kept ones first), D
features.

- ``permute(x_TD, plan) -> x_ND``: row n is ``x[plan.row_token_N[n]]``.
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

from . import row_ops
from .backends import triton_available
from .dispatch_plan import DispatchPlan


def _row_impl(backend: str):
    """Triton row kernels for ``backend='triton'``; PyTorch's gathers otherwise, ``auto``
    included: on an H100 they beat our row kernels (benchmarks/results/)."""
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs triton and CUDA (or TRITON_INTERPRET=1)")
        from . import triton_rows

        return triton_rows
    return row_ops


class Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: Tensor, plan: DispatchPlan, backend: str) -> Tensor:
        ops = _row_impl(backend)
        ctx.ops = ops
        ctx.save_for_backward(plan.pos_TK)
        return ops.gather_rows(x_TD, plan.row_token_N)

    @staticmethod
    def backward(ctx, dy_ND: Tensor):
        (pos_TK,) = ctx.saved_tensors
        return ctx.ops.combine_rows(dy_ND.contiguous(), pos_TK), None, None


class Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND: Tensor, gates_TK: Tensor, plan: DispatchPlan, backend: str) -> Tensor:
        ops = _row_impl(backend)
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
            dy = ctx.ops.gather_rows(g_TD, row_token_N[:n], scale_N)
        if ctx.needs_input_grad[1]:
            dgates = row_ops.copy_dot_rows(y_ND, pos_TK, g_TD).to(gates_TK.dtype)
        return dy, dgates, None, None


def permute(x_TD: Tensor, plan: DispatchPlan, backend: str = "auto") -> Tensor:
    """Gather the kept token copies into expert order: [T, D] -> [N, D]."""
    return Permute.apply(x_TD, plan, backend)


def unpermute(y_ND: Tensor, gates_TK: Tensor, plan: DispatchPlan, backend: str = "auto") -> Tensor:
    """Scatter expert outputs back to tokens, weighted by their gates: [N, D] -> [T, D]."""
    return Unpermute.apply(y_ND, gates_TK, plan, backend)
