"""The ``avx512`` backend: our grouped GEMMs (bfloat16, float32) for CPUs with AVX512-BF16.

Shape legend: N rows in expert order, E experts, I inner dim, O output dim.

The kernels are in ``cpu_gemm.cpp`` (why they exist is at its top), built into one module
with the dispatch rows (``cpu_rows``) and the router's (``cpu_router``). PyTorch's extension
builder compiles it the first time it is needed (about 40 s on 2 cores, with the system's
C++ compiler and ninja) and caches the result under ``~/.cache/torch_extensions``
(``TORCH_EXTENSIONS_DIR`` moves it; ``moe.kernels.cpu_build``). Where it cannot be built or
the CPU lacks the instructions, ``auto`` takes the ``avx2`` GEMMs (``cpu_gemm_avx2``) or
per-expert matmuls (the ``loop`` backend), and PyTorch's dispatch and router operations.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
from torch import Tensor

from . import cpu_build

# One module: the grouped GEMMs, the dispatch rows, the router's scores and SwiGLU.
PARTS = ("gemm", "rows", "router", "activation")
SOURCES = [str(Path(__file__).with_name(f"cpu_{part}.cpp")) for part in PARTS]
HEADER = Path(__file__).with_name("cpu_simd.h")
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]


def build_flags() -> list[str]:
    """CFLAGS and the shared header's digest: torch's loader rebuilds when a source or a flag
    changes, and would not see a change to the header alone."""
    digest = hashlib.sha256(HEADER.read_bytes()).hexdigest()[:16]
    return [*CFLAGS, f"-DMOE_CPU_SIMD_H={digest}"]


def cpu_has_avx512_bf16() -> bool:
    return "avx512_bf16" in cpu_build.cpu_flags()


@functools.cache
def module():
    """The compiled module of every source in SOURCES, built here the first time."""
    return cpu_build.load_extension("moe_cpu_gemm", SOURCES, build_flags())


_gate = cpu_build.Gate(
    "avx512", cpu_has_avx512_bf16, module, needs="CPUs with AVX512-BF16", lacks="avx512_bf16"
)
avx512_available = _gate.available  # whether the CPU has it and the kernels build (built here)
supports = _gate.supports
_require = _gate.require


def gmm(x_NI: Tensor, w_EIO: Tensor, offsets_E: Tensor, zero_tail: bool = True) -> Tensor:
    """Rows past the groups always come out zero (a slice of the output, free here). ``w``
    may be float32 (autocast's weight, rounded to bfloat16 inside the kernel)."""
    _require(x_NI)
    x_NI = x_NI.contiguous()
    w_EOI = w_EIO.transpose(1, 2)
    if w_EOI.is_contiguous():  # the forward of nn.Linear-layout experts
        return module().gmm_x_wt(x_NI, w_EOI, offsets_E, False)
    return module().gmm_x_w(x_NI, w_EIO.contiguous(), offsets_E)


def gmm_wgrad(
    x_NI: Tensor, dy_NO: Tensor, offsets_E: Tensor, out_dtype: torch.dtype | None = None
) -> Tensor:
    """``out_dtype=torch.float32``: the gradient of a float32 weight, straight from the
    float32 accumulators."""
    _require(x_NI)
    out_float32 = out_dtype == torch.float32
    return module().gmm_at_b(x_NI.contiguous(), dy_NO.contiguous(), offsets_E, out_float32)
