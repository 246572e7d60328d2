"""Triton grouped GEMM: forward/input-gradient kernel and weight-gradient kernel.

Shape legend: N rows (token copies in expert order), E experts, K inner dim, P output dim.

- ``gmm(x_NK, w_EKP, offsets_E) -> y_NP``: rows of group e (``offsets[e-1]:offsets[e]``)
  multiply ``w[e]``. ``w`` may be a transposed view; strides are passed through, so the
  input gradient ``dy @ w[e].T`` needs no copy.
- ``gmm_wgrad(x_NK, dy_NP, offsets_E) -> dw_EKP``: ``x[g].T @ dy[g]`` per group, zero for
  empty groups.

The row tiles of the forward kernel are scheduled from the offsets on the device (no host
sync): at most ``cdiv(N, BLOCK_M) + E`` tiles exist, since each group adds at most one
partial tile. Rows past ``offsets[-1]`` are never read or written.

float32 inputs follow ``torch.backends.cuda.matmul.allow_tf32`` (exact IEEE by default);
accumulation is float32 for every dtype. Triton's CPU interpreter computes bfloat16
``tl.dot`` wrongly (seen with triton 3.9), so under ``TRITON_INTERPRET=1`` the operands
are widened to float32 first (``WIDEN``); compiled kernels use the native dot.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_M = 128  # rows per forward tile; fixed because the tile schedule is built from it


def _launch_config(dtype: torch.dtype) -> dict:
    """Tile sizes and pipelining: 128x128 tiles for Hopper-class GPUs; float32 tiles take
    twice the shared memory, so shorter K-steps and two stages (the weight-gradient kernel's
    [128 x 128] float32 row block would not fit three). The interpreter ignores both."""
    if dtype == torch.float32:
        return {"BM": BLOCK_M, "BN": 128, "BK": 32, "num_warps": 8, "num_stages": 2}
    return {"BM": BLOCK_M, "BN": 128, "BK": 64, "num_warps": 8, "num_stages": 3}


WIDEN = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _gmm_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    offsets_ptr,
    tile_expert_ptr,
    tile_row_ptr,
    K,
    P,
    stride_xn,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wp,
    stride_yn,
    stride_yp,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    if e >= 0:
        row0 = tl.load(tile_row_ptr + tile)
        end = tl.load(offsets_ptr + e)
        rows = row0 + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        row_ok = rows < end
        col_ok = cols < P
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < K
            a = tl.load(
                x_ptr + rows[:, None] * stride_xn + ks[None, :] * stride_xk,
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            b = tl.load(
                w_ptr + e * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wp,
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            if WIDEN:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        tl.store(
            y_ptr + rows[:, None] * stride_yn + cols[None, :] * stride_yp,
            acc.to(y_ptr.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )


@triton.jit
def _gmm_wgrad_kernel(
    x_ptr,
    dy_ptr,
    dw_ptr,
    offsets_ptr,
    K,
    P,
    stride_xn,
    stride_xk,
    stride_dyn,
    stride_dyp,
    stride_we,
    stride_wk,
    stride_wp,
    PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    e = tl.program_id(0)
    ks = tl.program_id(1) * BK + tl.arange(0, BK)
    cols = tl.program_id(2) * BN + tl.arange(0, BN)
    k_ok = ks < K
    col_ok = cols < P
    end = tl.load(offsets_ptr + e)
    start = tl.where(e > 0, tl.load(offsets_ptr + tl.maximum(e - 1, 0)), 0)
    acc = tl.zeros([BK, BN], dtype=tl.float32)
    for r0 in range(start, end, BM):
        rows = r0 + tl.arange(0, BM)
        row_ok = rows < end
        xt = tl.load(
            x_ptr + rows[None, :] * stride_xn + ks[:, None] * stride_xk,
            mask=k_ok[:, None] & row_ok[None, :],
            other=0.0,
        )
        g = tl.load(
            dy_ptr + rows[:, None] * stride_dyn + cols[None, :] * stride_dyp,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if WIDEN:
            xt, g = xt.to(tl.float32), g.to(tl.float32)
        acc = tl.dot(xt, g, acc, input_precision=PRECISION)
    tl.store(
        dw_ptr + e * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wp,
        acc.to(dw_ptr.dtype.element_ty),
        mask=k_ok[:, None] & col_ok[None, :],
    )


def _row_tiles(offsets_E: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """Expert and first row of every forward row tile, -1 for unused tile slots."""
    E = offsets_E.shape[0]
    ends = offsets_E.long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = torch.cumsum(tiles, 0)
    slots = torch.arange(triton.cdiv(num_rows, BLOCK_M) + E, device=offsets_E.device)
    expert = torch.searchsorted(tile_end, slots, right=True)
    used = expert < E
    expert = expert.clamp(max=E - 1)
    row = (ends - counts)[expert] + (slots - (tile_end - tiles)[expert]) * BLOCK_M
    return torch.where(used, expert, -1).to(torch.int32), row.to(torch.int32)


def _precision(dtype: torch.dtype) -> str:
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "ieee"


@torch.library.custom_op("moe::triton_gmm", mutates_args=())
def gmm(x_NK: Tensor, w_EKP: Tensor, offsets_E: Tensor) -> Tensor:
    N, K = x_NK.shape
    E, _, P = w_EKP.shape
    y_NP = x_NK.new_empty(N, P)
    if N == 0 or E == 0 or P == 0:
        return y_NP
    if K == 0:
        return y_NP.zero_()
    tile_expert, tile_row = _row_tiles(offsets_E, N)
    cfg = _launch_config(x_NK.dtype)
    grid = (tile_expert.shape[0], triton.cdiv(P, cfg["BN"]))
    _gmm_kernel[grid](
        x_NK,
        w_EKP,
        y_NP,
        offsets_E,
        tile_expert,
        tile_row,
        K,
        P,
        x_NK.stride(0),
        x_NK.stride(1),
        *w_EKP.stride(),
        y_NP.stride(0),
        y_NP.stride(1),
        PRECISION=_precision(x_NK.dtype),
        WIDEN=WIDEN,
        **cfg,
    )
    return y_NP


@gmm.register_fake
def _(x_NK, w_EKP, offsets_E):
    return x_NK.new_empty(x_NK.shape[0], w_EKP.shape[2])


@torch.library.custom_op("moe::triton_gmm_wgrad", mutates_args=())
def gmm_wgrad(x_NK: Tensor, dy_NP: Tensor, offsets_E: Tensor) -> Tensor:
    K, P, E = x_NK.shape[1], dy_NP.shape[1], offsets_E.shape[0]
    dw_EKP = x_NK.new_empty(E, K, P)
    if dw_EKP.numel() == 0:
        return dw_EKP
    cfg = _launch_config(x_NK.dtype)
    grid = (E, triton.cdiv(K, cfg["BK"]), triton.cdiv(P, cfg["BN"]))
    _gmm_wgrad_kernel[grid](
        x_NK,
        dy_NP,
        dw_EKP,
        offsets_E,
        K,
        P,
        x_NK.stride(0),
        x_NK.stride(1),
        dy_NP.stride(0),
        dy_NP.stride(1),
        *dw_EKP.stride(),
        PRECISION=_precision(x_NK.dtype),
        WIDEN=WIDEN,
        **cfg,
    )
    return dw_EKP


@gmm_wgrad.register_fake
def _(x_NK, dy_NP, offsets_E):
    return x_NK.new_empty(offsets_E.shape[0], x_NK.shape[1], dy_NP.shape[1])
