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
DTYPES = (torch.bfloat16, torch.float32)


def cpu_has_avx2() -> bool:
    return {"avx2", "fma"} <= cpu_build.cpu_flags()


@functools.cache
def module():
    """The compiled module, built here the first time."""
    return cpu_build.load_extension("moe_cpu_gemm_avx2", [SOURCE], CFLAGS)


_available: bool | None = None  # None until the first eager call decides


def avx2_available() -> bool:
    """Whether this CPU has AVX2 and FMA and the kernels build (built here on first call)."""
    global _available
    if _available is None:
        _available = cpu_has_avx2() and cpu_build.builds(module, "avx2")
    return _available


def supports(x_NI: Tensor) -> bool:
    if x_NI.device.type != "cpu" or x_NI.dtype not in DTYPES:
        return False
    if torch.compiler.is_compiling():  # no file reads or builds inside a trace
        return _available is True
    return avx2_available()


def _require(x_NI: Tensor) -> None:
    if not supports(x_NI):
        raise ValueError(
            "backend='avx2' runs bfloat16 and float32 on x86 CPUs with AVX2 and FMA where its "
            f"kernels build; got {x_NI.dtype} on {x_NI.device.type}"
            f"{'' if cpu_has_avx2() else ' (this CPU lacks avx2 or fma)'}; use backend='auto'"
        )


def gmm(x_NI: Tensor, w_EIO: Tensor, offsets_E: Tensor, zero_tail: bool = True) -> Tensor:
    """Rows past the groups always come out zero. ``w`` may be a float32 weight under
    bfloat16 rows (autocast's master copy): rounded to bfloat16 as it is packed, as autocast
    would round it."""
    _require(x_NI)
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
    out_bf16 = x_NI.dtype == torch.bfloat16 and out_dtype != torch.float32
    return module().gmm_at_b(x_NI.float().contiguous(), dy_NO.contiguous(), offsets_E, out_bf16)
