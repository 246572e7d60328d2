"""Triton kernels for the row primitives (fused permute / unpermute).

Same contract as ``row_ops``: ``gather_rows`` and ``combine_rows`` here, ``copy_dot_rows``
PyTorch's (one multiply and a reduction). One program per
output row and feature block; ``combine_rows`` reads the K copies of a token and sums
them in float32 in registers, so unpermute is one pass with no atomics.

Imported only when the ``triton`` backend is asked for. On a CPU, set
``TRITON_INTERPRET=1`` before Triton is imported (the tests do) and use small shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .row_ops import copy_dot_rows  # noqa: F401  (the contract's third primitive)

BLOCK_D = 128


@triton.jit
def _gather_rows_kernel(
    src_ptr,
    index_ptr,
    scale_ptr,
    out_ptr,
    D,
    stride_src,
    stride_out,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    row = tl.load(index_ptr + n)
    vals = tl.load(src_ptr + row * stride_src + cols, mask=mask, other=0.0)
    if HAS_SCALE:
        vals = (vals.to(tl.float32) * tl.load(scale_ptr + n).to(tl.float32)).to(vals.dtype)
    tl.store(out_ptr + n * stride_out + cols, vals, mask=mask)


@triton.jit
def _combine_rows_kernel(
    y_ptr,
    pos_ptr,
    weight_ptr,
    out_ptr,
    D,
    stride_y,
    stride_out,
    K: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        row = tl.load(pos_ptr + t * K + k)
        if row >= 0:
            vals = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                vals = vals * tl.load(weight_ptr + t * K + k).to(tl.float32)
            acc += vals
    tl.store(out_ptr + t * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("moe::triton_gather_rows", mutates_args=())
def gather_rows(
    src_TD: Tensor, index_N: Tensor, scale_N: Tensor | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    src_TD = src_TD.contiguous()
    N, D = index_N.shape[0], src_TD.shape[1]
    out_ND = src_TD.new_empty(N, D)
    if N and D:
        scale = scale_N.contiguous() if scale_N is not None else index_N
        grid = (N, triton.cdiv(D, BLOCK_D))
        _gather_rows_kernel[grid](
            src_TD,
            index_N.contiguous(),
            scale,
            out_ND,
            D,
            src_TD.stride(0),
            out_ND.stride(0),
            HAS_SCALE=scale_N is not None,
            BLOCK=BLOCK_D,
        )
    # Cast by PyTorch: in Triton's interpreter a float32 -> bfloat16 cast was off by one unit
    # in half the values (not rounded to nearest even, as .to() rounds).
    return out_ND if dtype is None else out_ND.to(dtype)


@gather_rows.register_fake
def _(src_TD, index_N, scale_N=None, dtype=None):
    return src_TD.new_empty(index_N.shape[0], src_TD.shape[1], dtype=dtype)


@torch.library.custom_op("moe::triton_combine_rows", mutates_args=())
def combine_rows(
    y_ND: Tensor, pos_TK: Tensor, weight_TK: Tensor | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    T, K = pos_TK.shape
    D = y_ND.shape[1]
    out_TD = y_ND.new_zeros(T, D, dtype=dtype)
    if T and D and y_ND.shape[0]:
        y_ND = y_ND.contiguous()
        weight = weight_TK.contiguous() if weight_TK is not None else pos_TK
        grid = (T, triton.cdiv(D, BLOCK_D))
        _combine_rows_kernel[grid](
            y_ND,
            pos_TK.contiguous(),
            weight,
            out_TD,
            D,
            y_ND.stride(0),
            out_TD.stride(0),
            K=K,
            HAS_WEIGHT=weight_TK is not None,
            BLOCK=BLOCK_D,
        )
    return out_TD


@combine_rows.register_fake
def _(y_ND, pos_TK, weight_TK=None, dtype=None):
    return y_ND.new_empty(pos_TK.shape[0], y_ND.shape[1], dtype=dtype)
