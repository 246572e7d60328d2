"""Our CPU kernels for CPUs without AVX-512 (the `avx2` backend, ``kernels/cpu_gemm_avx2.cpp``):
their build and what only they do (their bfloat16 rounding, the library path for float32 groups
of many rows). What both CPU backends promise is in
``test_cpu_kernels.py``. They run on any x86 CPU with AVX2 and FMA, AVX-512 ones included."""

import importlib.util
import shutil
import warnings

import pytest
import torch
from moe.kernels import cpu_build, cpu_gemm_avx2, grouped_mm
from moe.kernels.cpu_gemm_avx2 import avx2_available

from tests.reference import generator, on_cpu, reference_gmm

needs_avx2 = pytest.mark.skipif(
    not avx2_available(),
    reason="the avx2 backend needs an x86 CPU with AVX2 and FMA and a C++ compiler",
)


def test_avx2_kernels_build_where_the_cpu_and_toolchain_allow():
    """The avx2 tests skip where the kernels are unavailable; a build that breaks on a machine
    that can build them must fail here instead of turning them into skips."""
    toolchain = shutil.which("c++") and (shutil.which("ninja") or importlib.util.find_spec("ninja"))
    if not (cpu_gemm_avx2.cpu_has_avx2() and toolchain):
        pytest.skip("no AVX2 CPU or no C++ compiler and ninja here")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        built = cpu_build.builds(cpu_gemm_avx2.module, "avx2")
    assert built and cpu_gemm_avx2.avx2_available(), [str(w.message) for w in caught]


@needs_avx2
@on_cpu
def test_avx2_rounds_its_float32_sums_to_bfloat16_as_torch_does():
    """The bfloat16 output is the float32 result rounded to nearest even, bit for bit as
    ``.to(torch.bfloat16)`` rounds, infinities included; NaN stays NaN (its bits differ
    within torch itself: 0x7fc0 from the scalar rounding, 0xffff from the vectorised one)."""
    g = generator(2)
    x = torch.randn(37, 19, generator=g)
    x[3, 0], x[5, 1], x[7, 2] = float("inf"), float("-inf"), float("nan")
    w = torch.randn(2, 19, 45, generator=g).bfloat16().float()  # exact in bfloat16
    # Row 0: 1 + j 2^-7 + 2^-8, halfway between two bfloat16 values (ties go to even).
    x[0] = 0.0
    x[0, :2] = 1.0
    w[0, 0], w[0, 1] = 1.0 + torch.arange(45) * 2.0**-7, 2.0**-8
    offsets = torch.tensor([20, 37])
    kernels = cpu_gemm_avx2.module()
    y32 = kernels.gmm(x, w, offsets, False, False, False)
    y16 = kernels.gmm(x, w, offsets, False, True, False)
    assert y16.dtype == torch.bfloat16 and y32.dtype == torch.float32
    assert y32.isnan().any() and y32.isinf().any()
    assert torch.equal(y32[0], 1.0 + torch.arange(45) * 2.0**-7 + 2.0**-8)
    nan = y32.isnan()
    assert torch.equal(y16.isnan(), nan)
    assert torch.equal(y16[~nan].view(torch.int16), y32[~nan].bfloat16().view(torch.int16))


@needs_avx2
@on_cpu
def test_avx2_float32_with_many_rows_per_expert_matches_float64():
    """float32 groups averaging 512 rows or more take a library matmul per expert
    (cpu_gemm_avx2.LIBRARY_FLOAT32_ROWS): the same contract, an empty expert and rows past
    the groups included."""
    counts = [1200, 0, 900, 1]
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    g = generator(13)
    N, K, P = sum(counts) + 5, 24, 40
    assert cpu_gemm_avx2.LIBRARY_FLOAT32_ROWS * len(counts) <= N
    x = torch.randn(N, K, generator=g, requires_grad=True)
    w_param = torch.randn(len(counts), P, K, generator=g, requires_grad=True)
    dy = torch.randn(N, P, generator=g)
    y = grouped_mm(x, w_param.transpose(1, 2), offsets, "avx2")
    y.backward(dy)
    xd, wd = x.detach().double().requires_grad_(), w_param.detach().double().requires_grad_()
    y_ref = reference_gmm(xd[:-5], wd.transpose(1, 2), offsets)  # the grouped rows
    y_ref.backward(dy[:-5].double())
    torch.testing.assert_close(y[:-5].double(), y_ref, rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(y[-5:]) == 0 and torch.count_nonzero(x.grad[-5:]) == 0
    torch.testing.assert_close(x.grad[:-5].double(), xd.grad[:-5], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w_param.grad.double(), wd.grad, rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(w_param.grad[1]) == 0
