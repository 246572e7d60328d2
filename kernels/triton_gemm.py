"""Triton grouped GEMM: the ops (``torch.library`` custom ops) and the plain-load kernels.

Shape legend: N rows (token copies in expert order), E experts, I inner dim, O output dim.

- ``gmm(x_NI, w_EIO, offsets_E) -> y_NO``: rows of group e (``offsets[e-1]:offsets[e]``)
  multiply ``w[e]``. ``w`` may be a transposed view; strides are passed through, so the
  input gradient ``dy @ w[e].T`` needs no copy. With 16-bit operands whose rows TMA can
  read, the persistent kernel of ``triton_tma`` (on an H200 0.88x the GPU time of
  PyTorch's grouped_mm, 0.69x at 128 experts; ``auto`` still takes grouped_mm, whose
  compiled launch costs the host less: ``backends.py``). Otherwise a kernel with plain
  loads whose row tiles are scheduled on the device first (``_row_tiles``: at most
  ``cdiv(N, BLOCK_M) + E`` tiles, since each group adds at most one partial tile).
- ``gmm_wgrad(x_NI, dy_NO, offsets_E) -> dw_EIO``: ``x[g].T @ dy[g]`` per group, zero for
  empty groups; with 16-bit row-major operands the TMA-fed kernel of ``triton_tma`` (about
  half the plain-load kernel's GPU time), else the plain-load one.

No kernel synchronises with the host; rows past ``offsets[-1]`` are never written.
float32 inputs follow ``torch.backends.cuda.matmul.allow_tf32`` (exact IEEE by default);
accumulation is float32 for every dtype; under Triton's interpreter the operands are
widened to float32 first (``triton_tma.WIDEN``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_tma import WIDEN, gmm_persistent, gmm_wgrad_tma

BLOCK_M = 128  # rows per forward tile; fixed because the tile schedule is built from it


def _launch_config(dtype: torch.dtype) -> dict:
    """Tile sizes and pipelining: 128x128 tiles for Hopper-class GPUs; float32 tiles take
    twice the shared memory, so shorter I-steps and two stages (the weight-gradient kernel's
    [128 x 128] float32 row block would not fit three). The interpreter ignores both."""
    if dtype == torch.float32:
        return {"BM": BLOCK_M, "BN": 128, "BI": 32, "num_warps": 8, "num_stages": 2}
    return {"BM": BLOCK_M, "BN": 128, "BI": 64, "num_warps": 8, "num_stages": 3}


@triton.jit
def _gmm_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    offsets_ptr,
    tile_expert_ptr,
    tile_row_ptr,
    I,
    O,
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
    BI: tl.constexpr,
):
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    if e >= 0:
        row0 = tl.load(tile_row_ptr + tile)
        end = tl.load(offsets_ptr + e)
        rows = row0 + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        row_ok = rows < end
        col_ok = cols < O
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for i0 in range(0, I, BI):
            inner = i0 + tl.arange(0, BI)
            inner_ok = inner < I
            a = tl.load(
                x_ptr + rows[:, None] * stride_xn + inner[None, :] * stride_xk,
                mask=row_ok[:, None] & inner_ok[None, :],
                other=0.0,
            )
            b = tl.load(
                w_ptr + e * stride_we + inner[:, None] * stride_wk + cols[None, :] * stride_wp,
                mask=inner_ok[:, None] & col_ok[None, :],
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
    I,
    O,
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
    BI: tl.constexpr,
):
    e = tl.program_id(0)
    inner = tl.program_id(1) * BI + tl.arange(0, BI)
    cols = tl.program_id(2) * BN + tl.arange(0, BN)
    inner_ok = inner < I
    col_ok = cols < O
    end = tl.load(offsets_ptr + e)
    start = tl.where(e > 0, tl.load(offsets_ptr + tl.maximum(e - 1, 0)), 0)
    acc = tl.zeros([BI, BN], dtype=tl.float32)
    for r0 in range(start, end, BM):
        rows = r0 + tl.arange(0, BM)
        row_ok = rows < end
        xt = tl.load(
            x_ptr + rows[None, :] * stride_xn + inner[:, None] * stride_xk,
            mask=inner_ok[:, None] & row_ok[None, :],
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
        dw_ptr + e * stride_we + inner[:, None] * stride_wk + cols[None, :] * stride_wp,
        acc.to(dw_ptr.dtype.element_ty),
        mask=inner_ok[:, None] & col_ok[None, :],
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
def gmm(x_NI: Tensor, w_EIO: Tensor, offsets_E: Tensor) -> Tensor:
    y_NO = gmm_persistent(x_NI, w_EIO, offsets_E)
    return gmm_pointer(x_NI, w_EIO, offsets_E) if y_NO is None else y_NO


@gmm.register_fake
def _(x_NI, w_EIO, offsets_E):
    return x_NI.new_empty(x_NI.shape[0], w_EIO.shape[2])


def gmm_pointer(x_NI: Tensor, w_EIO: Tensor, offsets_E: Tensor) -> Tensor:
    """The forward kernel with plain (masked pointer) loads: any dtype and strides."""
    N, I = x_NI.shape
    E, _, O = w_EIO.shape
    y_NO = x_NI.new_empty(N, O)
    if N == 0 or E == 0 or O == 0:
        return y_NO
    if I == 0:
        return y_NO.zero_()
    tile_expert, tile_row = _row_tiles(offsets_E, N)
    cfg = _launch_config(x_NI.dtype)
    grid = (tile_expert.shape[0], triton.cdiv(O, cfg["BN"]))
    _gmm_kernel[grid](
        x_NI,
        w_EIO,
        y_NO,
        offsets_E,
        tile_expert,
        tile_row,
        I,
        O,
        x_NI.stride(0),
        x_NI.stride(1),
        *w_EIO.stride(),
        y_NO.stride(0),
        y_NO.stride(1),
        PRECISION=_precision(x_NI.dtype),
        WIDEN=WIDEN,
        **cfg,
    )
    return y_NO


def gmm_wgrad_pointer(x_NI: Tensor, dy_NO: Tensor, offsets_E: Tensor) -> Tensor:
    """The weight-gradient kernel with plain (masked pointer) loads: any dtype and strides."""
    I, O, E = x_NI.shape[1], dy_NO.shape[1], offsets_E.shape[0]
    dw_EIO = x_NI.new_empty(E, I, O)
    if dw_EIO.numel() == 0:
        return dw_EIO
    cfg = _launch_config(x_NI.dtype)
    grid = (E, triton.cdiv(I, cfg["BI"]), triton.cdiv(O, cfg["BN"]))
    _gmm_wgrad_kernel[grid](
        x_NI,
        dy_NO,
        dw_EIO,
        offsets_E,
        I,
        O,
        x_NI.stride(0),
        x_NI.stride(1),
        dy_NO.stride(0),
        dy_NO.stride(1),
        *dw_EIO.stride(),
        PRECISION=_precision(x_NI.dtype),
        WIDEN=WIDEN,
        **cfg,
    )
    return dw_EIO


@torch.library.custom_op("moe::triton_gmm_wgrad", mutates_args=())
def gmm_wgrad(x_NI: Tensor, dy_NO: Tensor, offsets_E: Tensor) -> Tensor:
    dw_EIO = gmm_wgrad_tma(x_NI, dy_NO, offsets_E)
    return gmm_wgrad_pointer(x_NI, dy_NO, offsets_E) if dw_EIO is None else dw_EIO


@gmm_wgrad.register_fake
def _(x_NI, dy_NO, offsets_E):
    return x_NI.new_empty(offsets_E.shape[0], x_NI.shape[1], dy_NO.shape[1])
