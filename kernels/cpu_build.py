"""Building our C++ CPU kernels: PyTorch's extension builder compiles a module the first
time it is needed (with the system's C++ compiler and ninja) and caches it under
``~/.cache/torch_extensions`` (``TORCH_EXTENSIONS_DIR`` moves it)."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU (``/proc/cpuinfo``; none off Linux, where the
    build flags would not apply either)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    return frozenset(line.split(":", 1)[-1].split())


def load_extension(name: str, sources: list[str], cflags: list[str]):
    """The compiled module ``name`` of ``sources``, built here if it is not cached.
    ``-fopenmp`` goes with every build: at::parallel_for is inline OpenMP, and the module
    shares torch's OpenMP runtime."""
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # a virtual environment used without activating it
        with contextlib.suppress(ImportError):
            import ninja  # the PyPI package, a dependency

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")

    directory = build_directory(name)
    directory.mkdir(parents=True, exist_ok=True)
    with _held(directory / "moe.flock"):
        # torch's own lock is a plain file that every loading process creates and deletes,
        # even when nothing needs building: a process killed inside `load` leaves it behind
        # and every later process waits for it forever. Under our lock, which the OS
        # releases when its holder dies, no live process can own it: it is stale.
        (directory / "lock").unlink(missing_ok=True)
        return load(
            name=name,
            sources=sources,
            extra_cflags=[*cflags, "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
        )


def builds(module: Callable[[], object], backend: str) -> bool:
    """Whether ``module()`` loads; if not, one warning that says why (no compiler or ninja:
    the ``loop`` backend still works)."""
    try:
        module()
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(
            f"the {backend} grouped GEMM could not be built ({reason}); "
            "experts on this CPU use per-expert matmuls instead",
            stacklevel=4,
        )
        return False
    return True


class Gate:
    """Whether a CPU backend's kernels run here: the CPU has their instructions (``cpu_has``)
    and ``module()`` builds, decided at the first eager call and kept. Inside a compiled
    trace (no file reads or builds there) only what an eager call found out counts: a
    compiled layer's GEMMs are opaque ops that decide again, eagerly, when they run."""

    DTYPES = (torch.bfloat16, torch.float32)

    def __init__(
        self,
        backend: str,
        cpu_has: Callable[[], bool],
        module: Callable[[], object],
        needs: str,
        lacks: str,
    ):
        self.backend, self.cpu_has, self.module = backend, cpu_has, module
        self.needs, self.lacks = needs, lacks  # the CPU it needs, the flags a CPU may lack
        self.decided: bool | None = None

    def available(self) -> bool:
        """Whether the CPU has the instructions and the kernels build (built on first call)."""
        if self.decided is None:
            self.decided = self.cpu_has() and builds(self.module, self.backend)
        return self.decided

    def supports(self, x: torch.Tensor) -> bool:
        if x.device.type != "cpu" or x.dtype not in self.DTYPES:
            return False
        if torch.compiler.is_compiling():
            return self.decided is True
        return self.available()

    def require(self, x: torch.Tensor) -> None:
        if not self.supports(x):
            lacking = "" if self.cpu_has() else f" (this CPU lacks {self.lacks})"
            raise ValueError(
                f"backend='{self.backend}' runs bfloat16 and float32 on {self.needs} where its "
                f"kernels build; got {x.dtype} on {x.device.type}{lacking}; use backend='auto'"
            )


def build_directory(name: str) -> Path:
    """Where module ``name`` is built and cached: under ``TORCH_EXTENSIONS_DIR`` if set, else
    under torch's default (``~/.cache/torch_extensions``), which does not read that variable."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path(root) / f"{python}_torch{torch.__version__}" / name


@contextlib.contextmanager
def _held(lock_path: Path):
    """An exclusive lock between processes (``flock``), released when the file closes or
    its holder dies."""
    import fcntl  # POSIX only, as is the build: other systems never get here

    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
