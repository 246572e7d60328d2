"""permute / unpermute (kernels/permute.py) against a naive loop, forward and gradients."""

import pytest
import torch
from moe.kernels import permute, plan_dispatch, unpermute
from moe.kernels.backends import triton_available

from tests.kernels.test_dispatch_plan import random_choices
from tests.reference import generator

# auto: our CPU kernels (cpu_rows) on AVX512-BF16 CPUs, PyTorch's elsewhere.
ROW_BACKENDS = ["torch", "auto"] + (["triton"] if triton_available() else [])


def naive_unpermute(y, gates, plan):
    T, K = plan.pos_TK.shape
    out = torch.zeros(T, y.shape[1], dtype=y.dtype)
    for t in range(T):
        for k in range(K):
            p = int(plan.pos_TK[t, k])
            if p >= 0:
                out[t] = out[t] + gates[t, k] * y[p]
    return out


@pytest.mark.parametrize("backend", ROW_BACKENDS)
@pytest.mark.parametrize(
    "T,K,E,cap", [(17, 2, 5, 5), (9, 1, 3, None), (1, 4, 4, None), (0, 2, 3, 2)]
)
def test_permute_unpermute_forward_and_gradients(backend, T, K, E, cap):
    dtype = torch.float64 if backend == "torch" else torch.float32
    g = generator(T + K)
    ids = random_choices(T, K, E, g)
    plan = plan_dispatch(ids, E, cap)
    x = torch.randn(T, 11, dtype=dtype, generator=g, requires_grad=True)
    gates = torch.rand(T, K, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(plan.num_rows, 1, dtype=dtype, generator=g)  # makes each row distinct

    out = unpermute(permute(x, plan, backend) * w, gates, plan, backend)
    ref = naive_unpermute(x[plan.row_token_N] * w, gates, plan)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    dx, dg = torch.autograd.grad(out, (x, gates), grad)
    if T == 0:
        assert dx.shape == (0, 11) and dg.shape == (0, K)
        return
    rdx, rdg = torch.autograd.grad(ref, (x, gates), grad)
    torch.testing.assert_close(dx, rdx)
    torch.testing.assert_close(dg, rdg)


def test_permute_unpermute_gradcheck_float64():
    ids = torch.tensor([[0, 2], [1, 0], [0, 1], [2, 0]])
    plan = plan_dispatch(ids, 3, capacity=2)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(4, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda a, b: unpermute(permute(a, plan, "torch") ** 2, b, plan, "torch"), (x, gates)
    )


@pytest.mark.parametrize("backend", ROW_BACKENDS)
def test_permute_under_autocast_gathers_into_the_autocast_dtype(backend):
    """What the experts' GEMM would cast to, cast once while gathering; the gradient comes
    back in the input's dtype, equal to casting after a float32 permute."""
    g = generator(5)
    plan = plan_dispatch(random_choices(13, 2, 4, g), 4, 5)
    x = torch.randn(13, 19, generator=g, requires_grad=True)
    grad = torch.randn(plan.num_rows, 19, generator=g).bfloat16()
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        x_ND = permute(x, plan, backend)
    assert x_ND.dtype == torch.bfloat16
    (dx,) = torch.autograd.grad(x_ND, x, grad)
    ref = x[plan.row_token_N].bfloat16()
    assert dx.dtype == torch.float32
    torch.testing.assert_close(x_ND, ref, rtol=0, atol=0)
    kept = torch.zeros(plan.num_rows, 1)
    kept[: int(plan.offsets_E[-1])] = 1  # a dropped copy's row passes no gradient back
    (ref_dx,) = torch.autograd.grad(ref, x, grad * kept)
    torch.testing.assert_close(dx, ref_dx, rtol=2**-7, atol=1e-2)
