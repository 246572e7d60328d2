"""Triton grouped GEMMs fed by TMA (the tensor memory accelerator of Hopper-class GPUs;
16-bit operands), also run by Triton's interpreter on a CPU for the tests. The ops in
``triton_gemm`` run them where the GPU and the operands qualify, the plain-load kernels
otherwise.

Shape legend: N rows (token copies in expert order), E experts, I inner dim, O output dim.

- ``gmm_persistent(x_NI, w_EIO, offsets_E)``: the forward (and input gradient) as one
  persistent kernel that schedules its own tiles from the offsets.
- ``gmm_wgrad_tma(x_NI, dy_NO, offsets_E)``: the weight gradient, whole row steps by TMA.

Both return None where the operands do not qualify. Figures: an H200,
benchmarks/results/2026-11-27-h200-gemms.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# Triton's CPU interpreter computes bfloat16 ``tl.dot`` wrongly (seen with triton 3.9): under
# ``TRITON_INTERPRET=1`` every kernel of ours widens its operands to float32 first.
WIDEN = os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _has_tma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


@functools.cache
def _descriptor_class():
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # triton < 3.4
        return None
    return TensorDescriptor


def _tensor_descriptor(device: torch.device):
    """Triton's host-side TMA descriptor class, or None: also on GPUs before Hopper, which
    have no TMA unit and where these kernels were never measured (the interpreter, on a
    CPU, runs them for the tests)."""
    if device.type == "cuda" and not _has_tma(device.index or 0):
        return None
    return _descriptor_class()


def _tiles(config: dict) -> tuple[int, int, int, dict]:
    """(BM, BN, BI) of a kernel configuration, and the rest: Triton's launch options."""
    launch = dict(config)
    return launch.pop("BM"), launch.pop("BN"), launch.pop("BI"), launch


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


def gmm_persistent(x_NI: Tensor, w_EIO: Tensor, offsets_E: Tensor) -> Tensor | None:
    """The persistent TMA forward, or None where the operands do not qualify (16-bit,
    row-major rows and weights of 16-byte multiples, ``I`` a multiple of 64)."""
    bm, bn, bi, launch = _tiles(PERSISTENT_CONFIG)
    (N, I), (E, _, O) = x_NI.shape, w_EIO.shape
    TensorDescriptor = _tensor_descriptor(x_NI.device)
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
        **launch,
    )
    return y_NO


# The TMA weight-gradient kernel's tiles (16-bit operands): [128 x 256] of the output, 32
# rows of the reduction a step: the fastest of five shapes on an H200 over the weight
# gradients of the layer benchmark's and gpu_1b's shapes (benchmarks/results/2026-11-27-h200-gemms).
TMA_WGRAD_CONFIG = {"BM": 32, "BN": 256, "BI": 128, "num_warps": 8, "num_stages": 4}


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


def gmm_wgrad_tma(x_NI: Tensor, dy_NO: Tensor, offsets_E: Tensor) -> Tensor | None:
    """The weight-gradient kernel fed by TMA, or None where its operands do not qualify."""
    (N, I), O, E = x_NI.shape, dy_NO.shape[1], offsets_E.shape[0]
    TensorDescriptor = _tensor_descriptor(x_NI.device)
    if not (N and I and O and E) or TensorDescriptor is None:
        return None
    if not (_tma_operand(x_NI) and _tma_operand(dy_NO)):
        return None
    bm, bn, bi, launch = _tiles(TMA_WGRAD_CONFIG)
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
        **launch,
    )
    return dw_EIO
