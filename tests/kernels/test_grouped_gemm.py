import importlib.util
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from moe.kernels import cpu_gemm, grouped_mm, resolve_backend, torch_gmm_supports
from moe.kernels.backends import triton_available
from moe.kernels.cpu_gemm import avx512_available

from tests.reference import generator, on_cpu, reference_gmm

BACKENDS = ["loop", "torch", "auto"] + (["triton"] if triton_available() else [])
BACKENDS += ["avx512"] if torch.get_default_device().type == "cpu" and avx512_available() else []

# (rows per expert, K, P): random loads, empty experts, one expert taking every row,
# zero rows, a single row, odd sizes.
CASES = {
    "random": ([7, 0, 12, 3, 9], 16, 24),
    "empty_experts": ([0, 0, 5, 0, 0, 0, 1, 0], 8, 16),
    "one_expert_takes_all": ([0, 0, 23, 0], 12, 8),
    "zero_rows": ([0, 0, 0], 8, 8),
    "single_row": ([0, 1], 4, 4),
    "odd_sizes": ([5, 0, 3], 13, 7),
    "many_tiles": ([70, 1, 0, 130], 40, 72),
    # Past every tile and block size of the avx512 kernels, odd in every dim.
    "large_odd": ([201, 3, 0, 77, 33], 131, 301),
    # Over 256 rows per expert on average: the forward packs the weight instead of the rows
    # (cpu_gemm.cpp, gmm_x_wt: from 128) and the input gradient a panel of its columns at a
    # time (gmm_x_w: from 128 or 256), also across NC-column and MR-row tiles; the weight
    # gradient packs a group over 512 rows in parts (gmm_at_b).
    "many_rows_per_expert": ([701, 0, 411], 131, 150),
    # A reduction over several of the input gradient's weight blocks (cpu_gemm.cpp,
    # gmm_x_w_streamed_into: 252 rows of 520 bfloat16, 126 float32), odd at the end.
    "long_reduction": ([40, 0, 17, 65], 601, 520),
}


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


def test_kernels_build_under_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert cpu_gemm.build_directory().parent.parent == tmp_path


@needs_avx512
def test_a_lock_left_by_a_process_killed_while_loading_the_kernels_does_not_block():
    """Every process that loads the kernels holds torch's lock file for a moment; a process
    killed then (a preempted or crashed run) left it behind and every later run hung."""
    directory = cpu_gemm.build_directory()
    (directory / "lock").touch()  # what a SIGKILL inside torch's extension loader leaves
    load = "from moe.kernels import cpu_gemm; cpu_gemm.module()"
    out = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not (directory / "lock").exists()


@needs_avx512
@on_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("transposed", [False, True], ids=["EKP", "EPK_view"])
@pytest.mark.parametrize("case", list(CASES))
def test_avx512_matches_float64_on_the_same_inputs(case, transposed, dtype):
    """The kernels multiply exactly and accumulate in float32, so against float64 on the
    same inputs only the final rounding (bfloat16: 2^-9 relative) and float32 sums remain."""
    counts, K, P = CASES[case]
    E, N = len(counts), sum(counts)
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    g = generator(N * 5 + K)
    x = torch.randn(N, K, generator=g).to(dtype).requires_grad_()
    shape = (E, P, K) if transposed else (E, K, P)
    w_param = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    w = w_param.transpose(1, 2) if transposed else w_param
    dy = torch.randn(N, P, generator=g).to(dtype)

    y = grouped_mm(x, w, offsets, backend="avx512")
    y.backward(dy)
    xd = x.detach().double().requires_grad_()
    wd = w_param.detach().double().requires_grad_()
    y_ref = reference_gmm(xd, wd.transpose(1, 2) if transposed else wd, offsets)
    if N:
        y_ref.backward(dy.double())
    tol = {"rtol": 2**-8, "atol": 1e-4} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(x.grad.double(), xd.grad if N else torch.zeros_like(xd), **tol)
    torch.testing.assert_close(w_param.grad.double(), wd.grad if N else torch.zeros_like(wd), **tol)
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.count_nonzero(w_param.grad[e]) == 0
    assert w_param.grad.stride() == w_param.stride()


@needs_avx512
@on_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_avx512_zeroes_rows_past_the_groups_and_rejects_other_dtypes(dtype):
    x = torch.randn(20, 16).to(dtype).requires_grad_()
    w = torch.randn(3, 16, 24).to(dtype).requires_grad_()
    y = grouped_mm(x, w, torch.tensor([5, 5, 14], dtype=torch.int32), "avx512")
    y.backward(torch.randn(20, 24).to(dtype))
    assert torch.count_nonzero(y[14:]) == 0 and torch.count_nonzero(x.grad[14:]) == 0
    assert torch.count_nonzero(y[:14]) > 0
    with pytest.raises(ValueError, match="backend='avx512' runs bfloat16 and float32"):
        x64, w64 = torch.randn(4, 16).double(), torch.randn(2, 16, 8).double()
        grouped_mm(x64, w64, torch.tensor([1, 4]), "avx512")


@needs_avx512
@on_cpu
@pytest.mark.parametrize("case", ["large_odd", "many_rows_per_expert"])
@pytest.mark.parametrize("transposed", [False, True], ids=["EKP", "EPK_view"])
def test_avx512_rounds_a_float32_weight_inside_under_autocast(transposed, case):
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
            y = grouped_mm(xg, wg.transpose(1, 2) if transposed else wg, offsets, "avx512")
        y.backward(dy)
        results.append((y, xg.grad, wg.grad))
    (y, dx, dw), (y_ref, dx_ref, dw_bf16) = results
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    assert dw.dtype == torch.float32 and torch.equal(dw.bfloat16(), dw_bf16)
    xd, wd = x.bfloat16().double(), w32.bfloat16().double().requires_grad_()
    reference_gmm(xd, wd.transpose(1, 2) if transposed else wd, offsets).backward(dy.double())
    torch.testing.assert_close(dw.double(), wd.grad, rtol=1e-5, atol=1e-4)
    assert (dw_bf16.double() - wd.grad).abs().max() > 1e-2  # what the round trip would cost


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
    parallel_by_cost). Every output element comes from one task whatever the ranges, so any
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


@on_cpu
def test_autocast_casts_operands():
    offsets = torch.tensor([3, 5], dtype=torch.int32)
    x, w = torch.randn(5, 16), torch.randn(2, 16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_mm(x, w, offsets)
    assert y.dtype == torch.bfloat16


@on_cpu
def test_auto_on_cpu_picks_our_kernels_where_they_run_else_the_loop():
    x, w = torch.randn(4, 16), torch.randn(2, 16, 8)
    ours = "avx512" if avx512_available() else "loop"
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
