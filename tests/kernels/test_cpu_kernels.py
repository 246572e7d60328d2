"""What both of our CPU kernel backends promise (``avx512``, ``kernels/cpu_gemm.cpp``, and
``avx2``, ``kernels/cpu_gemm_avx2.cpp``), each where this machine runs it: results against
float64 on the same inputs, the same bits whatever the thread count, rows past the groups,
other dtypes refused, and a float32 weight under autocast rounded inside."""

import pytest
import torch
from moe.kernels import cpu_gemm, cpu_gemm_avx2, grouped_mm
from moe.kernels.cpu_gemm import avx512_available
from moe.kernels.cpu_gemm_avx2 import avx2_available

from tests.kernels.gemm_cases import CASES, WIDE_CASES
from tests.reference import generator, on_cpu, reference_gmm

OURS = [
    pytest.param(
        "avx512",
        marks=pytest.mark.skipif(
            not avx512_available(), reason="needs a CPU with AVX512-BF16 and a C++ compiler"
        ),
    ),
    pytest.param(
        "avx2",
        marks=pytest.mark.skipif(
            not avx2_available(), reason="needs an x86 CPU with AVX2 and FMA and a C++ compiler"
        ),
    ),
]


@on_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("transposed", [False, True], ids=["EKP", "EPK_view"])
@pytest.mark.parametrize("case", [*CASES, *WIDE_CASES])
@pytest.mark.parametrize("backend", OURS)
def test_matches_float64_on_the_same_inputs(backend, case, transposed, dtype):
    """The kernels multiply exactly and accumulate in float32, so against float64 on the
    same inputs only the final rounding (bfloat16: 2^-9 relative) and float32 sums remain;
    an empty expert's weight gradient is exactly zero."""
    counts, K, P = {**CASES, **WIDE_CASES}[case]
    E, N = len(counts), sum(counts)
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    g = generator(N * 5 + K)
    x = torch.randn(N, K, generator=g).to(dtype).requires_grad_()
    shape = (E, P, K) if transposed else (E, K, P)
    w_param = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    w = w_param.transpose(1, 2) if transposed else w_param
    dy = torch.randn(N, P, generator=g).to(dtype)

    y = grouped_mm(x, w, offsets, backend=backend)
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


@on_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("backend", OURS)
def test_zeroes_rows_past_the_groups_and_rejects_other_dtypes(backend, dtype):
    x = torch.randn(20, 16).to(dtype).requires_grad_()
    w = torch.randn(3, 16, 24).to(dtype).requires_grad_()
    y = grouped_mm(x, w, torch.tensor([5, 5, 14], dtype=torch.int32), backend)
    y.backward(torch.randn(20, 24).to(dtype))
    assert torch.count_nonzero(y[14:]) == 0 and torch.count_nonzero(x.grad[14:]) == 0
    assert torch.count_nonzero(y[:14]) > 0
    with pytest.raises(ValueError, match=f"backend='{backend}' runs bfloat16 and float32"):
        x64, w64 = torch.randn(4, 16).double(), torch.randn(2, 16, 8).double()
        grouped_mm(x64, w64, torch.tensor([1, 4]), backend)


@on_cpu
@pytest.mark.parametrize("case", ["large_odd", "many_rows_per_expert"])
@pytest.mark.parametrize("transposed", [False, True], ids=["EKP", "EPK_view"])
@pytest.mark.parametrize("backend", OURS)
def test_rounds_a_float32_weight_inside_under_autocast(backend, transposed, case):
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
            y = grouped_mm(xg, wg.transpose(1, 2) if transposed else wg, offsets, backend)
        y.backward(dy)
        results.append((y, xg.grad, wg.grad))
    (y, dx, dw), (y_ref, dx_ref, dw_bf16) = results
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    assert dw.dtype == torch.float32 and torch.equal(dw.bfloat16(), dw_bf16)
    xd, wd = x.bfloat16().double(), w32.bfloat16().double().requires_grad_()
    reference_gmm(xd, wd.transpose(1, 2) if transposed else wd, offsets).backward(dy.double())
    torch.testing.assert_close(dw.double(), wd.grad, rtol=1e-5, atol=1e-4)
    assert (dw_bf16.double() - wd.grad).abs().max() > 1e-2  # what the round trip would cost


MODULES = {"avx512": cpu_gemm, "avx2": cpu_gemm_avx2}


@on_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize(
    "counts, P",
    # Skewed as routing is in training: one expert with most rows, empty ones between. The
    # first averages under 128 rows per expert (avx512 forward: weight in place; input
    # gradient: streamed), the others over (both pack the weight by panels).
    [
        ([300, 0, 2, 0, 1, 45, 0, 0, 7, 3], 136),
        ([1900, 0, 2, 0, 1, 150, 0, 9], 136),
        ([1900, 0, 2, 0, 1, 150, 0, 9, 300, 0, 45, 7], 296),
    ],
    ids=["few_rows", "many_rows", "many_rows_wide"],
)
@pytest.mark.parametrize("backend", OURS)
def test_same_bits_whatever_the_thread_count(backend, counts, P, dtype):
    """The kernels hand each thread a range of tasks of about equal cost. Every output
    element comes from one task whatever the ranges, so any thread count gives the same bits;
    a task lost or run twice between ranges would not."""
    kernels = MODULES[backend]
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    g = generator(11)
    E, N, K = len(counts), sum(counts), 72
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
                    kernels.gmm(x, w.transpose(1, 2), offsets),  # forward: x @ w[e]^T
                    kernels.gmm(dy, w, offsets),  # input gradient: dy @ w[e]
                    kernels.gmm_wgrad(dy, x, offsets),  # weight gradient: dy^T x per group
                )
            )
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y_ref = reference_gmm(x64, w64.transpose(1, 2), offsets)
    y_ref.backward(dy.double())  # w64.grad = dy^T x per group: [E, P, K]
    for got, ref in zip(results[0], (y_ref, x64.grad, w64.grad), strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=2**-8, atol=1e-3)


@on_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize(
    "counts, K, P",
    # 2048 values a row: bfloat16 rows 4 KB apart, float32 ones 8 KB, which fall into one set
    # of the L1 cache and are copied a line further apart first (cpu_gemm.cpp, RowCopy): x in
    # the forward with the weight packed (with P=300, A for three column blocks in turn, each
    # expert's rows copied once), dy in the input gradient by column panels (bfloat16) or
    # streamed (float32 here; both dtypes in the last).
    [
        ([300, 0, 141], 2048, 24),
        ([300, 0, 141], 2048, 300),
        ([300, 0, 141], 24, 2048),
        ([40, 0, 17, 65], 24, 2048),
    ],
    ids=["K2048", "K2048_P300", "P2048", "P2048_few_rows"],
)
@pytest.mark.parametrize("transposed", [False, True], ids=["EKP", "EPK_view"])
@pytest.mark.parametrize("backend", OURS)
def test_rows_4kb_apart_match_float64(backend, transposed, counts, K, P, dtype):
    """Both layouts, so that each of x and dy is A in each GEMM path (the layer's EPK view:
    forward x @ w^T, input gradient dy @ w). Inputs scaled as a layer's are (outputs of order
    1), so that float32 sums over 2048 values stay within the tolerances of the other cases."""
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    g = generator(K + P)
    E, N = len(counts), sum(counts)
    x = (torch.randn(N, K, generator=g) / K**0.5).to(dtype).requires_grad_()
    shape = (E, P, K) if transposed else (E, K, P)
    w_param = (torch.randn(shape, generator=g) / P**0.5).to(dtype).requires_grad_()
    w = w_param.transpose(1, 2) if transposed else w_param
    dy = torch.randn(N, P, generator=g).to(dtype)
    y = grouped_mm(x, w, offsets, backend=backend)
    y.backward(dy)
    xd, wd = x.detach().double().requires_grad_(), w_param.detach().double().requires_grad_()
    y_ref = reference_gmm(xd, wd.transpose(1, 2) if transposed else wd, offsets)
    y_ref.backward(dy.double())
    tol = {"rtol": 2**-8, "atol": 1e-4} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    for got, ref in ((y, y_ref), (x.grad, xd.grad), (w_param.grad, wd.grad)):
        torch.testing.assert_close(got.double(), ref, **tol)
