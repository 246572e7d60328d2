"""Triton grouped GEMM: forward/input-gradient kernels and weight-gradient kernels.

Shape legend: N rows (token copies in expert order), E experts, I inner dim, O output dim.

- ``gmm(x_NI, w_EIO, offsets_E) -> y_NO``: rows of group e (``offsets[e-1]:offsets[e]``)
  multiply ``w[e]``. ``w`` may be a transposed view; strides are passed through, so the
  input gradient ``dy @ w[e].T`` needs no copy. With 16-bit operands whose rows TMA can
  read (``gmm_persistent``), one persistent kernel fed by TMA schedules its own tiles from
  the offsets: on an H200 0.88x the GPU time of PyTorch's grouped_mm (0.69x at 128
  experts); ``auto`` still takes grouped_mm, whose compiled launch costs the host less
  (``backends.py``). Otherwise a kernel with plain loads whose row tiles are scheduled on
  the device first (``_row_tiles``: at most ``cdiv(N, BLOCK_M) + E`` tiles, since each
  group adds at most one partial tile).
- ``gmm_wgrad(x_NI, dy_NO, offsets_E) -> dw_EIO``: ``x[g].T @ dy[g]`` per group, zero for
  empty groups. With 16-bit row-major operands its rows arrive by TMA (``gmm_wgrad_tma``):
  about half the GPU time of the plain-load kernel, level with grouped_mm up to 32 experts
  and 1.2x its time at 128.

No kernel synchronises with the host; rows past ``offsets[-1]`` are never written.
float32 inputs follow ``torch.backends.cuda.matmul.allow_tf32`` (exact IEEE by default);
accumulation is float32 for every dtype. Triton's CPU interpreter computes bfloat16
``tl.dot`` wrongly (seen with triton 3.9), so under ``TRITON_INTERPRET=1`` the operands
are widened to float32 first (``WIDEN``); compiled kernels use the native dot.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_M = 128  # rows per forward tile; fixed because the tile schedule is built from it


def _launch_config(dtype: torch.dtype) -> dict:
    """Tile sizes and pipelining: 128x128 tiles for Hopper-class GPUs; float32 tiles take
    twice the shared memory, so shorter I-steps and two stages (the weight-gradient kernel's
    [128 x 128] float32 row block would not fit three). The interpreter ignores both."""
    if dtype == torch.float32:
        return {"BM": BLOCK_M, "BN": 128, "BI": 32, "num_warps": 8, "num_stages": 2}
    return {"BM": BLOCK_M, "BN": 128, "BI": 64, "num_warps": 8, "num_stages": 3}


WIDEN = os.environ.get("TRITON_INTERPRET") == "1"


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


@triton.jit
def _gmm_persistent_kernel(
    x_desc,
    w_desc,
    y_ptr,
    offsets_ptr,
    E,
    I,
    O,
    stride_yn,
    NUM_PROGRAMS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    W_K_MAJOR: tl.constexpr,
    WIDEN: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BI: tl.constexpr,
):
    """A fixed set of programs walks the output tiles, each program every NUM_PROGRAMS-th.
    The tile schedule comes from the offsets inside the kernel (every program sums the
    group sizes itself: no host or extra launch); a row block's column tiles are neighbours
    in the walk, so the row block and the expert's weight stay in L2 while they are read.
    Operands arrive by TMA, ``x`` as one [N, I] matrix and the weights as one [E*O, I]
    (K-major) or [E*I, O] matrix: a tile's rows past its group are read, never stored, and
    the reduction needs ``I % BI == 0`` (else it would read the next expert's rows)."""
    experts = tl.arange(0, BLOCK_E)
    valid = experts < E
    ends = tl.load(offsets_ptr + experts, mask=valid, other=0)
    starts = tl.load(offsets_ptr + experts - 1, mask=valid & (experts > 0), other=0)
    row_tiles = tl.where(valid, (ends - starts + BM - 1) // BM, 0)
    tiles_end = tl.cumsum(row_tiles, 0)
    num_col_blocks = tl.cdiv(O, BN)
    for tile in range(tl.program_id(0), tl.sum(row_tiles, 0) * num_col_blocks, NUM_PROGRAMS):
        row_tile = tile // num_col_blocks
        col0 = (tile % num_col_blocks) * BN
        e = tl.sum((tiles_end <= row_tile).to(tl.int32), 0)
        this = experts == e
        row0 = tl.sum(tl.where(this, starts + (row_tile - tiles_end + row_tiles) * BM, 0), 0)
        end = tl.sum(tl.where(this, ends, 0), 0)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for i0 in range(0, I, BI):
            a = x_desc.load([row0, i0])
            if W_K_MAJOR:  # noqa: SIM108  (a compile-time branch: one of the two is generated)
                b = w_desc.load([e * O + col0, i0]).T
            else:
                b = w_desc.load([e * I + i0, col0])
            if WIDEN:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        rows = row0 + tl.arange(0, BM)
        cols = col0 + tl.arange(0, BN)
        tl.store(
            y_ptr + rows[:, None] * stride_yn + cols[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=(rows < end)[:, None] & (cols < O)[None, :],
        )


@triton.jit
def _gmm_wgrad_tma_kernel(
    x_desc,
    dy_desc,
    x_ptr,
    dy_ptr,
    dw_ptr,
    offsets_ptr,
    I,
    O,
    num_col_blocks,
    tiles_per_expert,
    stride_xn,
    stride_dyn,
    stride_we,
    stride_wk,
    WIDEN: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BI: tl.constexpr,
):
    """``dw[e][tile] = x[g].T @ dy[g]``, the group's rows as the reduction: whole [BM]-row
    blocks by TMA, the last partial one by masked loads (TMA would read the next group's
    rows into the sum)."""
    pid = tl.program_id(0)
    e = pid // tiles_per_expert
    t = pid % tiles_per_expert
    i0 = (t // num_col_blocks) * BI
    o0 = (t % num_col_blocks) * BN
    end = tl.load(offsets_ptr + e)
    start = tl.where(e > 0, tl.load(offsets_ptr + tl.maximum(e - 1, 0)), 0)
    full_end = start + (end - start) // BM * BM
    acc = tl.zeros([BI, BN], dtype=tl.float32)
    for r0 in range(start, full_end, BM):
        xt = x_desc.load([r0, i0])
        g = dy_desc.load([r0, o0])
        if WIDEN:
            xt, g = xt.to(tl.float32), g.to(tl.float32)
        acc = tl.dot(xt.T, g, acc)
    if full_end < end:
        rows = full_end + tl.arange(0, BM)
        inner = i0 + tl.arange(0, BI)
        cols = o0 + tl.arange(0, BN)
        row_ok = rows < end
        xt = tl.load(
            x_ptr + rows[:, None] * stride_xn + inner[None, :],
            mask=row_ok[:, None] & (inner < I)[None, :],
            other=0.0,
        )
        g = tl.load(
            dy_ptr + rows[:, None] * stride_dyn + cols[None, :],
            mask=row_ok[:, None] & (cols < O)[None, :],
            other=0.0,
        )
        if WIDEN:
            xt, g = xt.to(tl.float32), g.to(tl.float32)
        acc = tl.dot(xt.T, g, acc)
    inner = i0 + tl.arange(0, BI)
    cols = o0 + tl.arange(0, BN)
    tl.store(
        dw_ptr + e * stride_we + inner[:, None] * stride_wk + cols[None, :],
        acc.to(dw_ptr.dtype.element_ty),
        mask=(inner < I)[:, None] & (cols < O)[None, :],
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


# The TMA weight-gradient kernel's tiles (16-bit operands): [128 x 256] of the output, 32
# rows of the reduction a step: the fastest of five shapes on an H200 over the weight
# gradients of the layer benchmark's and gpu_1b's shapes (benchmarks/results/2026-11-27-h200-gemms).
TMA_WGRAD_CONFIG = {"BM": 32, "BN": 256, "BI": 128, "num_warps": 8, "num_stages": 4}


def _tensor_descriptor():
    """Triton's host-side TMA descriptor class (triton >= 3.4), or None."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


def _tma_operand(t: Tensor) -> bool:
    """Whether a matrix can be read by TMA: 16-bit, unit column stride, 16-byte aligned rows."""
    size = t.element_size()
    aligned = (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0
    return t.dtype in (torch.bfloat16, torch.float16) and t.stride(1) == 1 and aligned


# The persistent forward's tiles: [128 x 128], 4 warps, two programs per SM. On an H200,
# against PyTorch's grouped_mm over the forward and input-gradient GEMMs of the layer
# benchmark's shapes and gpu_1b's (GPU time, CUDA-graph replays): 0.88x its time (geometric
# mean; 0.69x at 128 experts, 1.01x at worst); [128 x 256] tiles with 8 warps, one program
# per SM, 0.89x; [128 x 128] with 8 warps and 4 stages 1.01x
# (benchmarks/results/2026-11-27-h200-gemms).
PERSISTENT_CONFIG = {"BM": 128, "BN": 128, "BI": 64, "num_warps": 4, "num_stages": 3}
PROGRAMS_PER_SM = 2


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton's interpreter, in the tests: a few programs, each several tiles
    return PROGRAMS_PER_SM * _num_sms(device.index or 0)


def _tma_weight(w_EIO: Tensor) -> tuple[Tensor, bool] | None:
    """The experts' weights as one TMA matrix, and whether it is K-major ([E*O, I])."""
    E, I, O = w_EIO.shape
    if w_EIO.transpose(1, 2).is_contiguous():
        matrix, k_major = w_EIO.transpose(1, 2).reshape(E * O, I), True
    elif w_EIO.is_contiguous():
        matrix, k_major = w_EIO.reshape(E * I, O), False
    else:
        return None
    return (matrix, k_major) if _tma_operand(matrix) else None


def gmm_persistent(x_NI: Tensor, w_EIO: Tensor, offsets_E: Tensor) -> Tensor | None:
    """The persistent TMA forward, or None where the operands do not qualify (16-bit,
    row-major rows and weights of 16-byte multiples, ``I`` a multiple of 64)."""
    cfg = dict(PERSISTENT_CONFIG)
    bm, bn, bi = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("BI")
    (N, I), (E, _, O) = x_NI.shape, w_EIO.shape
    TensorDescriptor = _tensor_descriptor()
    if not (N and I and O and E) or I % bi or TensorDescriptor is None:
        return None
    weight = _tma_weight(w_EIO) if _tma_operand(x_NI) else None
    if weight is None or w_EIO.dtype != x_NI.dtype:
        return None
    matrix, k_major = weight
    y_NO = x_NI.new_empty(N, O)
    programs = _num_programs(x_NI.device)
    _gmm_persistent_kernel[(programs,)](
        TensorDescriptor.from_tensor(x_NI, [bm, bi]),
        TensorDescriptor.from_tensor(matrix, [bn, bi] if k_major else [bi, bn]),
        y_NO,
        offsets_E,
        E,
        I,
        O,
        y_NO.stride(0),
        NUM_PROGRAMS=programs,
        BLOCK_E=triton.next_power_of_2(E),
        W_K_MAJOR=k_major,
        WIDEN=WIDEN,
        BM=bm,
        BN=bn,
        BI=bi,
        **cfg,
    )
    return y_NO


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


def gmm_wgrad_tma(x_NI: Tensor, dy_NO: Tensor, offsets_E: Tensor) -> Tensor | None:
    """The weight-gradient kernel fed by TMA, or None where its operands do not qualify."""
    (N, I), O, E = x_NI.shape, dy_NO.shape[1], offsets_E.shape[0]
    TensorDescriptor = _tensor_descriptor()
    if not (N and I and O and E) or TensorDescriptor is None:
        return None
    if not (_tma_operand(x_NI) and _tma_operand(dy_NO)):
        return None
    cfg = dict(TMA_WGRAD_CONFIG)
    bm, bn, bi = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("BI")
    dw_EIO = x_NI.new_empty(E, I, O)
    num_col_blocks = triton.cdiv(O, bn)
    tiles_per_expert = triton.cdiv(I, bi) * num_col_blocks
    _gmm_wgrad_tma_kernel[(E * tiles_per_expert,)](
        TensorDescriptor.from_tensor(x_NI, [bm, bi]),
        TensorDescriptor.from_tensor(dy_NO, [bm, bn]),
        x_NI,
        dy_NO,
        dw_EIO,
        offsets_E,
        I,
        O,
        num_col_blocks,
        tiles_per_expert,
        x_NI.stride(0),
        dy_NO.stride(0),
        dw_EIO.stride(0),
        dw_EIO.stride(1),
        WIDEN=WIDEN,
        BM=bm,
        BN=bn,
        BI=bi,
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
