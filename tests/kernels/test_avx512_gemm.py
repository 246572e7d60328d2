"""Our CPU kernels (the `avx512` backend, ``kernels/cpu_gemm.cpp``): their build and what only
they do (float32 outputs). What both CPU backends promise (results against float64, the same
bits whatever the thread count, a float32 weight rounded inside) is in
``test_cpu_kernels.py``."""

import importlib.util
import shutil
import warnings

import pytest
import torch
from moe.kernels import cpu_build, cpu_gemm
from moe.kernels.cpu_gemm import avx512_available

from tests.kernels.gemm_cases import CASES
from tests.reference import generator, on_cpu, reference_gmm

needs_avx512 = pytest.mark.skipif(
    not avx512_available(),
    reason="the avx512 backend needs a CPU with AVX512-BF16 and a C++ compiler",
)


def test_avx512_kernels_build_where_the_cpu_and_toolchain_allow():
    """The avx512 tests skip where the kernels are unavailable; a build that breaks on a
    machine that can build them must fail here instead of turning them into skips."""
    toolchain = shutil.which("c++") and (shutil.which("ninja") or importlib.util.find_spec("ninja"))
    if not (cpu_gemm.cpu_has_avx512_bf16() and toolchain):
        pytest.skip("no AVX512-BF16 CPU or no C++ compiler and ninja here")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        built = cpu_build.builds(cpu_gemm.module, "avx512")  # builds, or warns why it could not
    assert built and cpu_gemm.avx512_available(), [str(w.message) for w in caught]


@needs_avx512
@on_cpu
@pytest.mark.parametrize("case", ["large_odd", "many_rows_per_expert", "empty_experts"])
def test_avx512_forward_stores_float32_when_asked(case):
    """The router's logits (kernels/cpu_router.py): bfloat16 operands, float32 output straight
    from the accumulators, on both forward kernels (weight read in place, and packed from 128
    rows per expert): float64-close to float32 sums, and rounded, the bfloat16 output."""
    counts, K, P = CASES[case]
    offsets = torch.cumsum(torch.tensor(counts), 0)
    g = generator(5)
    x = torch.randn(sum(counts), K, generator=g).bfloat16()
    w_EPK = torch.randn(len(counts), P, K, generator=g).bfloat16()
    kernels = cpu_gemm.module()
    y = kernels.gmm_x_wt(x, w_EPK, offsets, True)
    assert y.dtype == torch.float32
    y_ref = reference_gmm(x.double(), w_EPK.double().transpose(1, 2), offsets)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(y.bfloat16(), kernels.gmm_x_wt(x, w_EPK, offsets, False))
