"""Interchangeable implementations of the two grouped-GEMM primitives.

Shape legend: N rows in expert order, E experts, I inner dim, O output dim.

Every backend provides:
- ``gmm(x_NI, w_EIO, offsets_E, zero_tail) -> y_NO``: ``y[g] = x[g] @ w[e]`` for each
  group g of rows ``offsets[e-1]:offsets[e]``; ``w`` may be a transposed view. Rows past
  ``offsets[-1]`` (copies dropped by capacity) belong to no group and come out zero, unless
  ``zero_tail`` is False (the caller knows there are none; on a GPU that skips a pass over
  the output).
- ``gmm_wgrad(x_NI, dy_NO, offsets_E) -> dw_EIO``: ``dw[e] = x[g].T @ dy[g]``; an empty
  group gets zeros; rows past ``offsets[-1]`` do not count.

Names: ``loop`` (per-expert ``mm``, the reference), ``torch``
(``torch.nn.functional.grouped_mm``), ``triton`` (our GPU kernels), ``avx512`` (our
bfloat16 and float32 CPU kernels, ``cpu_gemm.cpp``), ``avx2`` (the same for CPUs without
AVX-512, ``cpu_gemm_avx2.cpp``), and ``auto``, which picks per
primitive what is fastest and correct for the device and dtype.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_gemm, cpu_gemm_avx2

BACKENDS = ("auto", "loop", "torch", "triton", "avx512", "avx2")
# torch 2.11 runs float32 grouped_mm on CUDA (exact, no TF32; checked on an H100 with this
# suite); older builds take bfloat16 only there.
_CUDA_FLOAT32_GROUPED_MM = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 11)


# oneDNN, which runs bfloat16/float16 matmuls on the CPU, compiles a kernel for every new
# row count and caches a bounded number; routing changes the counts every step. Splitting
# each group into a multiple of ROW_QUANTUM rows plus a remainder keeps the set of shapes
# small. Measured on 2 cores, E=8, bf16, fresh routing every call: 30 ms -> 6 ms for one
# [4096 x 512] x [512 x 2048] projection.
ROW_QUANTUM = 64


def _group_pieces(x_NI: Tensor, offsets_E: Tensor) -> list[list[tuple[int, int]]]:
    """Row ranges per expert: the group itself, or its bulk and remainder (see above)."""
    bounds = [0, *offsets_E.tolist()]
    split = x_NI.device.type == "cpu" and x_NI.dtype in (torch.bfloat16, torch.float16)
    pieces = []
    for lo, hi in itertools.pairwise(bounds):
        mid = lo + (hi - lo) // ROW_QUANTUM * ROW_QUANTUM if split else hi
        pieces.append([(a, b) for a, b in ((lo, mid), (mid, hi)) if b > a])
    return pieces


def loop_gmm(x_NI: Tensor, w_EIO: Tensor, offsets_E: Tensor, zero_tail: bool = True) -> Tensor:
    """Zeroes the rows past the groups whatever ``zero_tail`` says: with the group ends on
    the host that is a slice of the output, free."""
    y_NO = x_NI.new_empty(x_NI.shape[0], w_EIO.shape[2])
    pieces = _group_pieces(x_NI, offsets_E)
    for e, rows in enumerate(pieces):
        for lo, hi in rows:
            torch.mm(x_NI[lo:hi], w_EIO[e], out=y_NO[lo:hi])
    y_NO[max((hi for rows in pieces for _, hi in rows), default=0) :].zero_()
    return y_NO


def zero_rows_past_groups(y_NO: Tensor, offsets_E: Tensor) -> Tensor:
    """Zero the rows past ``offsets[-1]`` without reading it on the host."""
    if offsets_E.shape[0] == 0:
        return y_NO.zero_()
    past = torch.arange(y_NO.shape[0], device=y_NO.device) >= offsets_E[-1]
    return y_NO.masked_fill_(past.unsqueeze(1), 0)


def loop_gmm_wgrad(x_NI: Tensor, dy_NO: Tensor, offsets_E: Tensor) -> Tensor:
    E = offsets_E.shape[0]
    dw_EIO = x_NI.new_empty(E, x_NI.shape[1], dy_NO.shape[1])
    for e, rows in enumerate(_group_pieces(x_NI, offsets_E)):
        if not rows:
            dw_EIO[e].zero_()
        for i, (lo, hi) in enumerate(rows):
            if i == 0:
                torch.mm(x_NI[lo:hi].t(), dy_NO[lo:hi], out=dw_EIO[e])
            else:
                dw_EIO[e].addmm_(x_NI[lo:hi].t(), dy_NO[lo:hi])
    return dw_EIO


def torch_gmm_supports(x_NI: Tensor, w_EIO: Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` takes these operands on this build."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x_NI.dtype not in (torch.float32, torch.bfloat16):
        return False
    if x_NI.is_cuda and x_NI.dtype == torch.float32 and not _CUDA_FLOAT32_GROUPED_MM:
        return False
    if x_NI.is_cuda and torch.cuda.get_device_capability(x_NI.device) < (8, 0):
        return False
    # Its kernels need every stride of both operands to be a multiple of 16 bytes.
    size = x_NI.element_size()
    return (x_NI.shape[1] * size) % 16 == 0 and (w_EIO.shape[2] * size) % 16 == 0


def _require_torch_support(x_NI: Tensor, w_EIO: Tensor) -> None:
    if not torch_gmm_supports(x_NI, w_EIO):
        raise ValueError(
            f"backend='torch' cannot run {x_NI.dtype} on {x_NI.device.type} with inner dim "
            f"{x_NI.shape[1]} and output dim {w_EIO.shape[2]} (grouped_mm needs a supported "
            "dtype and dims that are multiples of 16 bytes); use backend='auto'"
        )


def torch_gmm(x_NI: Tensor, w_EIO: Tensor, offsets_E: Tensor, zero_tail: bool = True) -> Tensor:
    _require_torch_support(x_NI, w_EIO)
    y_NO = F.grouped_mm(x_NI, w_EIO, offs=offsets_E)
    return zero_rows_past_groups(y_NO, offsets_E) if zero_tail else y_NO


def torch_gmm_wgrad(x_NI: Tensor, dy_NO: Tensor, offsets_E: Tensor) -> Tensor:
    _require_torch_support(x_NI, dy_NO.unsqueeze(0))
    if x_NI.shape[0] == 0:
        return x_NI.new_zeros(offsets_E.shape[0], x_NI.shape[1], dy_NO.shape[1])
    return F.grouped_mm(x_NI.t(), dy_NO, offs=offsets_E)


# Looked up once, here: layers ask inside compiled code, and torch 2.11's compiler refuses
# to trace ``find_spec`` (a compiled layer on the triton backend failed on an H200).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Triton kernels run natively on CUDA, and on the CPU under ``TRITON_INTERPRET=1``."""
    if not _TRITON_INSTALLED:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton(x_NI: Tensor):
    if x_NI.dtype not in TRITON_DTYPES:
        raise ValueError(f"backend='triton' supports {TRITON_DTYPES}, got {x_NI.dtype}; use 'loop'")
    if not triton_available():
        raise ValueError(
            "backend='triton' needs the triton package and a CUDA device "
            "(or TRITON_INTERPRET=1 on the CPU, for tests); use backend='auto'"
        )
    from . import triton_gemm

    return triton_gemm


def triton_gmm(x_NI: Tensor, w_EIO: Tensor, offsets_E: Tensor, zero_tail: bool = True) -> Tensor:
    y_NO = _triton(x_NI).gmm(x_NI, w_EIO, offsets_E)
    return zero_rows_past_groups(y_NO, offsets_E) if zero_tail else y_NO


def triton_gmm_wgrad(x_NI: Tensor, dy_NO: Tensor, offsets_E: Tensor) -> Tensor:
    return _triton(x_NI).gmm_wgrad(x_NI, dy_NO, offsets_E)


@dataclass(frozen=True)
class GemmBackend:
    name: str
    gmm: Callable[[Tensor, Tensor, Tensor, bool], Tensor]
    gmm_wgrad: Callable[[Tensor, Tensor, Tensor], Tensor]


LOOP = GemmBackend("loop", loop_gmm, loop_gmm_wgrad)
TORCH = GemmBackend("torch", torch_gmm, torch_gmm_wgrad)
TRITON = GemmBackend("triton", triton_gmm, triton_gmm_wgrad)
AVX512 = GemmBackend("avx512", cpu_gemm.gmm, cpu_gemm.gmm_wgrad)
AVX2 = GemmBackend("avx2", cpu_gemm_avx2.gmm, cpu_gemm_avx2.gmm_wgrad)


def resolve_backend(name: str, x_NI: Tensor, w_EIO: Tensor) -> GemmBackend:
    """The backend that ``name`` means for these operands."""
    if name == "loop":
        return LOOP
    if name == "torch":
        return TORCH
    if name == "triton":
        return TRITON
    if name == "avx512":
        return AVX512
    if name == "avx2":
        return AVX2
    if name != "auto":
        raise ValueError(f"unknown grouped GEMM backend {name!r}; choose one of {BACKENDS}")
    if x_NI.is_cuda:
        # grouped_mm, also where our persistent Triton forward takes less GPU time (0.88x
        # on an H200): launched from a custom op, its host work made the compiled layer
        # slower (benchmarks/results/2026-11-27-h200-gemms).
        if torch_gmm_supports(x_NI, w_EIO):
            return TORCH
        use_triton = triton_available() and x_NI.dtype in TRITON_DTYPES
        return TRITON if use_triton else LOOP
    # On the CPU, our kernels where the CPU has AVX512-BF16 (cpu_gemm.cpp says why): the
    # bfloat16 training step 1.1-1.3x the per-expert oneDNN GEMMs
    # (benchmarks/results/2026-11-26-cpu-avx512), the float32 step 1.1x per-expert MKL once
    # freed memory is kept for reuse, as the trainer does (moe/train/host_memory.py; without
    # that, ours paid page faults on its one large output per call and trailed MKL's many
    # small ones: benchmarks/results/2026-11-27-cpu). Both beat grouped_mm, which
    # concatenates per-group results and whose weight gradient is 2-4x slower.
    if cpu_gemm.supports(x_NI):
        return AVX512
    # Without AVX-512, our AVX2 kernels (cpu_gemm_avx2.cpp): PyTorch's bfloat16 matmul runs
    # a generic GEMM there (the layer on it 38-71x slower); in float32 1.0-2.3x DeepSpeed-MoE
    # (benchmarks/results/2026-11-28-cpu-avx2).
    if cpu_gemm_avx2.supports(x_NI):
        return AVX2
    return LOOP
