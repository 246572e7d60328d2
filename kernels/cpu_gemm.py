"""The ``avx512`` backend: our grouped GEMMs (bfloat16, float32) for CPUs with AVX512-BF16.

Shape legend: N rows in expert order, E experts, I inner dim, O output dim.

The kernels are in ``cpu_gemm.cpp`` (why they exist is at its top), built into one module
with the dispatch rows (``cpu_rows``) and the router's (``cpu_router``). PyTorch's extension
builder compiles it the first time it is needed (about 40 s on 2 cores, with the system's
C++ compiler and ninja) and caches the result under ``~/.cache/torch_extensions``
(``TORCH_EXTENSIONS_DIR`` moves it). Where it cannot be built or the CPU lacks the
instructions, ``auto`` keeps per-expert matmuls (the ``loop`` backend) and PyTorch's
dispatch and router operations.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

# One module: the grouped GEMMs, the dispatch rows, the router's scores and SwiGLU.
PARTS = ("gemm", "rows", "router", "activation")
SOURCES = [str(Path(__file__).with_name(f"cpu_{part}.cpp")) for part in PARTS]
HEADER = Path(__file__).with_name("cpu_simd.h")
# -fopenmp: at::parallel_for is inline OpenMP; the process shares torch's OpenMP runtime.
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp"]


def build_flags() -> list[str]:
    """CFLAGS and the shared header's digest: torch's loader rebuilds when a source or a flag
    changes, and would not see a change to the header alone."""
    digest = hashlib.sha256(HEADER.read_bytes()).hexdigest()[:16]
    return [*CFLAGS, f"-DMOE_CPU_SIMD_H={digest}"]


def cpu_has_avx512_bf16() -> bool:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no build flags for it either
        return False
    flag_lines = (line for line in cpuinfo.splitlines() if line.startswith("flags"))
    return any("avx512_bf16" in line.split() for line in flag_lines)


@functools.cache
def module():
    """The compiled module of every source in SOURCES, built here the first time."""
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # a virtual environment used without activating it
        with contextlib.suppress(ImportError):
            import ninja  # the PyPI package, a dependency

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    with _held(directory / "moe.flock"):
        # torch's own lock is a plain file that every loading process creates and deletes,
        # even when nothing needs building: a process killed inside `load` leaves it behind
        # and every later process waits for it forever. Under our lock, which the OS
        # releases when its holder dies, no live process can own it: it is stale.
        (directory / "lock").unlink(missing_ok=True)
        return load(
            name="moe_cpu_gemm",
            sources=SOURCES,
            extra_cflags=build_flags(),
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
        )


def build_directory() -> Path:
    """Where the kernels are built and cached: under ``TORCH_EXTENSIONS_DIR`` if set, else
    under torch's default (``~/.cache/torch_extensions``), which does not read that variable."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path(root) / f"{python}_torch{torch.__version__}" / "moe_cpu_gemm"


@contextlib.contextmanager
def _held(lock_path: Path):
    """An exclusive lock between processes (``flock``), released when the file closes or
    its holder dies."""
    import fcntl  # POSIX only, as is the build: other systems never get here

    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


_available: bool | None = None  # None until the first eager call decides


def avx512_available() -> bool:
    """Whether this CPU has AVX512-BF16 and the kernels build (built here on first call)."""
    global _available
    if _available is None:
        _available = cpu_has_avx512_bf16() and _builds()
    return _available


def _builds() -> bool:
    try:
        module()
    except Exception as err:  # no compiler or ninja: the loop backend still works
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(
            f"the avx512 grouped GEMM could not be built ({reason}); "
            "experts on this CPU use per-expert matmuls instead",
            stacklevel=3,
        )
        return False
    return True


DTYPES = (torch.bfloat16, torch.float32)


def supports(x_NI: Tensor) -> bool:
    if x_NI.device.type != "cpu" or x_NI.dtype not in DTYPES:
        return False
    if torch.compiler.is_compiling():
        # No file reads or builds inside a trace: what eager calls found out (a compiled
        # layer's GEMMs are opaque ops that decide again, eagerly, when they run).
        return _available is True
    return avx512_available()


def _require(x_NI: Tensor) -> None:
    if not supports(x_NI):
        raise ValueError(
            "backend='avx512' runs bfloat16 and float32 on CPUs with AVX512-BF16 where its "
            "kernels build; "
            f"got {x_NI.dtype} on {x_NI.device.type}"
            f"{'' if cpu_has_avx512_bf16() else ' (this CPU lacks avx512_bf16)'}; "
            "use backend='auto'"
        )


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


def keeps_float32_weight(x_NI: Tensor, w_EIO: Tensor) -> bool:
    """Whether a float32 weight can go to the kernels as it is under bfloat16 autocast."""
    return x_NI.dtype == torch.bfloat16 and w_EIO.dtype == torch.float32 and supports(x_NI)
