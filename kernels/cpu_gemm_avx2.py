"""The ``avx2`` backend: our grouped GEMMs (bfloat16, float32) for x86 CPUs with AVX2 and
FMA but without AVX512-BF16, where the ``avx512`` kernels cannot run.

Shape legend: N rows in expert order, E experts, I inner dim, O output dim.

The kernels are in ``cpu_gemm_avx2.cpp`` (why they exist is at its top), a module of their
own, compiled for AVX2 only (the ``avx512`` module's flags would let the compiler emit
instructions these CPUs lack). Built the first time it is needed (about 30 s on 2 cores)
and cached as the other is (``moe.kernels.cpu_build``). bfloat16 rows are widened to
float32 here, once per call, and every sum is float32; the dispatch, router and activation
around the GEMMs stay PyTorch's operations on these CPUs.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor

from . import cpu_build

SOURCE = str(Path(__file__).with_suffix(".cpp"))
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c"]


def cpu_has_avx2() -> bool:
    return {"avx2", "fma"} <= cpu_build.cpu_flags()


@functools.cache
def module():
    """The compiled module, built here the first time."""
    return cpu_build.load_extension("moe_cpu_gemm_avx2", [SOURCE], CFLAGS)


_gate = cpu_build.Gate(
    "avx2", cpu_has_avx2, module, needs="x86 CPUs with AVX2 and FMA", lacks="avx2 or fma"
)
avx2_available = _gate.available  # whether the CPU has it and the kernels build (built here)
supports = _gate.supports
_require = _gate.require


# float32 groups of this many rows on average and more go to one library matmul per expert
# (MKL): on a 2-core AMD EPYC (Zen 3) its float32 GEMMs ran those shapes faster than ours
# (the layer at 8 experts, 512-1024 rows each: 88-95% of dense against our 73-84%; at 32
# experts, 128-256 rows, ours 87-90% against its 73-79%: benchmarks/results/2026-11-28-cpu-avx2).
LIBRARY_FLOAT32_ROWS = 512


def _library_wins(x_NI: Tensor, experts: int) -> bool:
    return x_NI.dtype == torch.float32 and x_NI.shape[0] >= LIBRARY_FLOAT32_ROWS * experts


def _group_ends(offsets_E: Tensor) -> list[tuple[int, int]]:
    ends = offsets_E.tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def gmm(x_NI: Tensor, w_EIO: Tensor, offsets_E: Tensor, zero_tail: bool = True) -> Tensor:
    """Rows past the groups always come out zero. ``w`` may be a float32 weight under
    bfloat16 rows (autocast's master copy): rounded to bfloat16 as it is packed, as autocast
    would round it."""
    _require(x_NI)
    if _library_wins(x_NI, w_EIO.shape[0]):
        y_NO = x_NI.new_empty(x_NI.shape[0], w_EIO.shape[2])
        groups = _group_ends(offsets_E)
        for e, (lo, hi) in enumerate(groups):
            torch.mm(x_NI[lo:hi], w_EIO[e], out=y_NO[lo:hi])
        return y_NO.index_fill_(0, torch.arange(groups[-1][1] if groups else 0, len(y_NO)), 0)
    rows_bf16 = x_NI.dtype == torch.bfloat16
    x32_NI = x_NI.float().contiguous()
    round_w = rows_bf16 and w_EIO.dtype == torch.float32
    w_EOI = w_EIO.transpose(1, 2)
    if w_EOI.is_contiguous():  # the forward of nn.Linear-layout experts
        return module().gmm(x32_NI, w_EOI, offsets_E, True, rows_bf16, round_w)
    return module().gmm(x32_NI, w_EIO.contiguous(), offsets_E, False, rows_bf16, round_w)


def gmm_wgrad(
    x_NI: Tensor, dy_NO: Tensor, offsets_E: Tensor, out_dtype: torch.dtype | None = None
) -> Tensor:
    """``out_dtype=torch.float32``: the gradient of a float32 weight, straight from the
    float32 sums."""
    _require(x_NI)
    if _library_wins(x_NI, offsets_E.shape[0]):
        dw_EIO = x_NI.new_empty(offsets_E.shape[0], x_NI.shape[1], dy_NO.shape[1])
        for e, (lo, hi) in enumerate(_group_ends(offsets_E)):
            torch.mm(x_NI[lo:hi].t(), dy_NO[lo:hi], out=dw_EIO[e])
        return dw_EIO
    out_bf16 = x_NI.dtype == torch.bfloat16 and out_dtype != torch.float32
    return module().gmm_at_b(x_NI.float().contiguous(), dy_NO.contiguous(), offsets_E, out_bf16)
