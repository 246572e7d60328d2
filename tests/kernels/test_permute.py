"""permute / unpermute (kernels/permute.py) against a naive loop, forward and gradients."""

import pytest
import torch
from moe.kernels import permute, plan_dispatch, unpermute
from moe.kernels.backends import triton_available

from tests.kernels.test_dispatch_plan import random_choices
from tests.reference import generator

ROW_BACKENDS = ["torch"] + (["triton"] if triton_available() else [])


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
