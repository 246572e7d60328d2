"""Building our CPU kernels (``moe.kernels.cpu_build``): where they are cached, and a lock
that a killed process leaves behind."""

import subprocess
import sys

import pytest
from moe.kernels import cpu_build
from moe.kernels.cpu_gemm import avx512_available
from moe.kernels.cpu_gemm_avx2 import avx2_available

# (module, the Python module that loads it): the ones this machine runs.
MODULES = [("moe_cpu_gemm", "cpu_gemm")] if avx512_available() else []
MODULES += [("moe_cpu_gemm_avx2", "cpu_gemm_avx2")] if avx2_available() else []


def test_kernels_build_under_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert cpu_build.build_directory("moe_cpu_gemm").parent.parent == tmp_path


@pytest.mark.parametrize(("name", "loader"), MODULES)
def test_a_lock_left_by_a_process_killed_while_loading_the_kernels_does_not_block(name, loader):
    """Every process that loads the kernels holds torch's lock file for a moment; a process
    killed then (a preempted or crashed run) left it behind and every later run hung."""
    directory = cpu_build.build_directory(name)
    (directory / "lock").touch()  # what a SIGKILL inside torch's extension loader leaves
    load = f"from moe.kernels import {loader}; {loader}.module()"
    out = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not (directory / "lock").exists()
