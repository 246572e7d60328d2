"""Our CPU kernels (the `avx512` backend, ``kernels/cpu_gemm.cpp``): their build and what only
they do (float32 outputs, thread ranges of equal cost). What both CPU backends promise
(results against float64, a float32 weight rounded inside) is in ``test_cpu_kernels.py``."""

import importlib.util
import shutil
import warnings

import pytest
import torch
from moe.kernels import cpu_gemm
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
        cpu_gemm._builds()  # builds, or warns why it could not
    assert cpu_gemm.avx512_available(), [str(w.message) for w in caught]


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


@needs_avx512
@on_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize(
    "counts",
    # Skewed as routing is in training: one expert with most rows, empty ones between. The
    # first averages under 128 rows per expert (forward: weight in place; input gradient:
    # streamed), the second over (both pack the weight by panels).
    [[300, 0, 2, 0, 1, 45, 0, 0, 7, 3], [1900, 0, 2, 0, 1, 150, 0, 9]],
    ids=["few_rows", "many_rows"],
)
def test_avx512_same_bits_whatever_the_thread_count(counts, dtype):
    """The kernels hand each thread a range of tasks of about equal cost (cpu_gemm.cpp,
    parallel_by_rows). Every output element comes from one task whatever the ranges, so any
    thread count gives the same bits; a task lost or run twice between ranges would not."""
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    g = generator(11)
    E, N, K, P = len(counts), sum(counts), 72, 136
    x = torch.randn(N, K, generator=g).to(dtype)
    w = torch.randn(E, P, K, generator=g).to(dtype)
    dy = torch.randn(N, P, generator=g).to(dtype)
    kernels = cpu_gemm.module()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 7):
            torch.set_num_threads(n)
            results.append(
                (
                    kernels.gmm_x_wt(x, w, offsets, False),
                    kernels.gmm_x_w(dy, w, offsets),
                    kernels.gmm_at_b(dy, x, offsets, False),
                )
            )
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y_ref = reference_gmm(x64, w64.transpose(1, 2), offsets)
    y_ref.backward(dy.double())  # w64.grad = dy^T x per group, gmm_at_b's [E, P, K]
    for got, ref in zip(results[0], (y_ref, x64.grad, w64.grad), strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=2**-8, atol=1e-3)
