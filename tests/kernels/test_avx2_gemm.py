"""Our CPU kernels for CPUs without AVX-512 (the `avx2` backend, ``kernels/cpu_gemm_avx2.cpp``):
their build, and their results against float64 on the same inputs, including what only our
CPU kernels do (a float32 weight rounded inside, a float32 weight gradient, thread ranges of
equal cost). They run on any x86 CPU with AVX2 and FMA, AVX-512 ones included."""

import importlib.util
import shutil
import warnings

import pytest
import torch
from moe.kernels import cpu_build, cpu_gemm_avx2, grouped_mm
from moe.kernels.cpu_gemm_avx2 import avx2_available

from tests.kernels.gemm_cases import CASES
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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("transposed", [False, True], ids=["EKP", "EPK_view"])
@pytest.mark.parametrize("case", list(CASES))
def test_avx2_matches_float64_on_the_same_inputs(case, transposed, dtype):
    """Exact products and float32 sums: against float64 on the same inputs only the final
    rounding (bfloat16: 2^-9 relative) and float32 sums remain; an empty expert's weight
    gradient is exactly zero."""
    counts, K, P = CASES[case]
    E, N = len(counts), sum(counts)
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    g = generator(N * 3 + K)
    x = torch.randn(N, K, generator=g).to(dtype).requires_grad_()
    shape = (E, P, K) if transposed else (E, K, P)
    w_param = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    w = w_param.transpose(1, 2) if transposed else w_param
    dy = torch.randn(N, P, generator=g).to(dtype)

    y = grouped_mm(x, w, offsets, backend="avx2")
    y.backward(dy)
    xd = x.detach().double().requires_grad_()
    wd = w_param.detach().double().requires_grad_()
    y_ref = reference_gmm(xd, wd.transpose(1, 2) if transposed else wd, offsets)
    if N:
        y_ref.backward(dy.double())
    tol = {"rtol": 2**-8, "atol": 1e-4} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    assert y.dtype == x.grad.dtype == w_param.grad.dtype == dtype
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(x.grad.double(), xd.grad if N else torch.zeros_like(xd), **tol)
    torch.testing.assert_close(w_param.grad.double(), wd.grad if N else torch.zeros_like(wd), **tol)
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.count_nonzero(w_param.grad[e]) == 0
    assert w_param.grad.stride() == w_param.stride()


@needs_avx2
@on_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_avx2_zeroes_rows_past_the_groups_and_rejects_other_dtypes(dtype):
    x = torch.randn(20, 16).to(dtype).requires_grad_()
    w = torch.randn(3, 16, 24).to(dtype).requires_grad_()
    y = grouped_mm(x, w, torch.tensor([5, 5, 14], dtype=torch.int32), "avx2")
    y.backward(torch.randn(20, 24).to(dtype))
    assert torch.count_nonzero(y[14:]) == 0 and torch.count_nonzero(x.grad[14:]) == 0
    assert torch.count_nonzero(y[:14]) > 0
    with pytest.raises(ValueError, match="backend='avx2' runs bfloat16 and float32"):
        x64, w64 = torch.randn(4, 16).double(), torch.randn(2, 16, 8).double()
        grouped_mm(x64, w64, torch.tensor([1, 4]), "avx2")


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
@pytest.mark.parametrize("case", ["large_odd", "many_rows_per_expert"])
@pytest.mark.parametrize("transposed", [False, True], ids=["EKP", "EPK_view"])
def test_avx2_rounds_a_float32_weight_inside_under_autocast(transposed, case):
    """Under autocast a float32 weight goes to the kernels as it is: the same outputs and
    input gradient as the bfloat16 copy autocast would make, bit for bit, and a float32
    weight gradient with no bfloat16 rounding (float64-close to 1e-5, where the rounded one
    is 2^-9 off)."""
    counts, K, P = CASES[case]
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    g = generator(3)
    x = torch.randn(sum(counts), K, generator=g)
    w32 = torch.randn((len(counts), P, K) if transposed else (len(counts), K, P), generator=g)
    dy = torch.randn(sum(counts), P, generator=g).bfloat16()
    results = []
    for w in (w32.clone(), w32.bfloat16()):
        xg, wg = x.clone().requires_grad_(), w.requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = grouped_mm(xg, wg.transpose(1, 2) if transposed else wg, offsets, "avx2")
        y.backward(dy)
        results.append((y, xg.grad, wg.grad))
    (y, dx, dw), (y_ref, dx_ref, dw_bf16) = results
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    assert dw.dtype == torch.float32 and torch.equal(dw.bfloat16(), dw_bf16)
    xd, wd = x.bfloat16().double(), w32.bfloat16().double().requires_grad_()
    reference_gmm(xd, wd.transpose(1, 2) if transposed else wd, offsets).backward(dy.double())
    torch.testing.assert_close(dw.double(), wd.grad, rtol=1e-5, atol=1e-4)
    assert (dw_bf16.double() - wd.grad).abs().max() > 1e-2  # what the round trip would cost


@needs_avx2
@on_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_avx2_same_bits_whatever_the_thread_count(dtype):
    """Each thread gets a range of tasks of about equal cost (routing skewed as in training:
    one expert with most rows, empty ones between). Every output element comes from one task
    whatever the ranges, so any thread count gives the same bits; a task lost or run twice
    between ranges would not."""
    counts = [1900, 0, 2, 0, 1, 150, 0, 9, 300, 0, 45, 7]
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    g = generator(11)
    E, N, K, P = len(counts), sum(counts), 72, 296
    x = torch.randn(N, K, generator=g).to(dtype)
    w = torch.randn(E, P, K, generator=g).to(dtype)
    dy = torch.randn(N, P, generator=g).to(dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 7):
            torch.set_num_threads(n)
            results.append(
                (
                    cpu_gemm_avx2.gmm(x, w.transpose(1, 2), offsets),
                    cpu_gemm_avx2.gmm(dy, w, offsets),
                    cpu_gemm_avx2.gmm_wgrad(dy, x, offsets),
                )
            )
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y_ref = reference_gmm(x64, w64.transpose(1, 2), offsets)
    y_ref.backward(dy.double())  # w64.grad = dy^T x per group: gmm_wgrad(dy, x)
    for got, ref in zip(results[0], (y_ref, x64.grad, w64.grad), strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=2**-8, atol=1e-3)


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
