import pytest
import torch
from moe.kernels import grouped_mm, resolve_backend, torch_gmm_supports
from moe.kernels.backends import triton_available
from moe.kernels.cpu_gemm import avx512_available
from moe.kernels.cpu_gemm_avx2 import avx2_available

from tests.kernels.gemm_cases import CASES
from tests.reference import generator, on_cpu, reference_gmm

BACKENDS = ["loop", "torch", "auto"] + (["triton"] if triton_available() else [])
if torch.get_default_device().type == "cpu":  # our CPU kernels, where this machine runs them
    BACKENDS += ["avx512"] if avx512_available() else []
    BACKENDS += ["avx2"] if avx2_available() else []


def dtype_for(backend):
    return torch.float64 if backend == "loop" else torch.float32


@pytest.mark.parametrize("transposed", [False, True], ids=["EKP", "EPK_view"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_mm_matches_per_group_reference(backend, case, transposed):
    counts, K, P = CASES[case]
    dtype = dtype_for(backend)
    E, N = len(counts), sum(counts)
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    g = generator(N * 7 + K)
    x = torch.randn(N, K, dtype=dtype, generator=g, requires_grad=True)
    if transposed:  # the nn.Linear layout [E, P, K], used as a transposed view
        w_param = torch.randn(E, P, K, dtype=dtype, generator=g, requires_grad=True)
        w = w_param.transpose(1, 2)
    else:
        w_param = w = torch.randn(E, K, P, dtype=dtype, generator=g, requires_grad=True)
    if backend == "torch" and not torch_gmm_supports(x, w):
        with pytest.raises(ValueError, match="use backend='auto'"):
            grouped_mm(x, w, offsets, backend=backend)
        return

    y = grouped_mm(x, w, offsets, backend=backend)
    ref = reference_gmm(x.detach().double(), w.detach().double(), offsets)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y.double(), ref, **tol)

    dy = torch.randn(N, P, dtype=dtype, generator=g)
    y.backward(dy)
    xd = x.detach().double().requires_grad_()
    wd = w_param.detach().double().requires_grad_()
    wv = wd.transpose(1, 2) if transposed else wd
    reference_gmm(xd, wv, offsets).backward(dy.double()) if N else None
    ref_dx = xd.grad if N else torch.zeros_like(xd)
    ref_dw = wd.grad if N else torch.zeros_like(wd)
    torch.testing.assert_close(x.grad.double(), ref_dx, **tol)
    torch.testing.assert_close(w_param.grad.double(), ref_dw, **tol)
    # Empty experts get an exact zero gradient, and the gradient keeps the parameter layout.
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.count_nonzero(w_param.grad[e]) == 0
    assert w_param.grad.stride() == w_param.stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_past_the_groups_are_zero_unless_there_are_none(backend):
    """Rows past ``offsets[-1]`` (copies dropped by capacity) come out zero, and so does
    their input gradient; ``zero_tail=False``, for groups that cover every row, changes
    nothing in the forward or any gradient."""
    g = generator(11)
    x = torch.randn(20, 16, generator=g, requires_grad=True)
    w = torch.randn(3, 16, 24, generator=g, requires_grad=True)
    dy = torch.randn(20, 24, generator=g)
    short = torch.tensor([5, 5, 14], dtype=torch.int32)  # 6 rows past the groups
    y = grouped_mm(x, w, short, backend)
    y.backward(dy)
    assert torch.count_nonzero(y[14:]) == 0 and torch.count_nonzero(x.grad[14:]) == 0
    assert torch.count_nonzero(y[:14]) > 0

    full = torch.tensor([5, 5, 20], dtype=torch.int32)
    results = []
    for zero_tail in (True, False):
        x.grad = w.grad = None
        y = grouped_mm(x, w, full, backend, zero_tail=zero_tail)
        y.backward(dy)
        results.append((y.detach(), x.grad, w.grad))
    for zeroed, kept in zip(*results, strict=True):
        assert torch.equal(zeroed, kept)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_close_to_float32(backend):
    # Groups above 64 rows exercise the loop's bulk + remainder split for bfloat16.
    counts = [9, 0, 130, 64, 6]
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    x = torch.randn(sum(counts), 32, requires_grad=True)
    w = torch.randn(5, 32, 16, requires_grad=True)
    xb = x.detach().bfloat16().requires_grad_()
    wb = w.detach().bfloat16().requires_grad_()
    y = grouped_mm(xb, wb, offsets, backend=backend)
    assert y.dtype == torch.bfloat16
    ref = reference_gmm(x, w, offsets)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-1)
    dy = torch.randn_like(ref)
    y.backward(dy.bfloat16())
    ref.backward(dy)
    torch.testing.assert_close(xb.grad.float(), x.grad, rtol=2e-2, atol=3e-1)
    torch.testing.assert_close(wb.grad.float(), w.grad, rtol=2e-2, atol=6e-1)


@on_cpu
def test_autocast_casts_operands():
    offsets = torch.tensor([3, 5], dtype=torch.int32)
    x, w = torch.randn(5, 16), torch.randn(2, 16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_mm(x, w, offsets)
    assert y.dtype == torch.bfloat16


@on_cpu
def test_auto_on_cpu_picks_our_kernels_where_they_run_else_the_loop():
    """avx512 where the CPU has AVX512-BF16, else avx2 where it has AVX2 and FMA."""
    x, w = torch.randn(4, 16), torch.randn(2, 16, 8)
    ours = "avx512" if avx512_available() else "avx2" if avx2_available() else "loop"
    assert resolve_backend("auto", x, w).name == ours
    assert resolve_backend("auto", x.bfloat16(), w.bfloat16()).name == ours
    assert resolve_backend("auto", x.double(), w.double()).name == "loop"


def test_bad_arguments_fail_with_one_clear_line():
    with pytest.raises(ValueError, match="unknown grouped GEMM backend"):
        grouped_mm(torch.randn(2, 4), torch.randn(1, 4, 4), torch.tensor([2]), backend="cublas")
    with pytest.raises(ValueError, match=r"x \[N, I\] and w \[E, I, O\]"):
        grouped_mm(torch.randn(2, 4), torch.randn(1, 5, 4), torch.tensor([2]))
    with pytest.raises(ValueError, match="one entry per expert"):
        grouped_mm(torch.randn(2, 4), torch.randn(2, 4, 4), torch.tensor([2]))
