"""The CPU dispatch kernels (kernels/cpu_rows.py) against float64 references: the three row
primitives in every dtype pairing, with dropped copies and odd widths, and the dropless plan
against the sorting one, field by field."""

import pytest
import torch
from moe.kernels import cpu_rows, permute, plan_dispatch, row_ops, unpermute

from tests.kernels.test_dispatch_plan import random_choices
from tests.reference import generator, on_cpu

pytestmark = pytest.mark.skipif(
    not cpu_rows.usable(torch.zeros(1, device="cpu")),
    reason="our CPU kernels need a CPU with AVX512-BF16 and a C++ compiler",
)
DTYPES = [torch.float32, torch.bfloat16]
# (T, K, E, capacity, D): dropless, dropped copies, one expert per token, odd widths past the
# 16-lane tails, no tokens.
SHAPES = [
    (37, 2, 5, None, 40),
    (50, 2, 4, 9, 33),
    (19, 1, 3, None, 16),
    (23, 4, 6, 11, 7),
    (0, 2, 3, None, 8),
]


def tolerance(dtype):
    """One bfloat16 rounding of the result (float32 sums), or float32 rounding."""
    return (
        {"rtol": 2**-8, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    )


def plan_and_rows(T, K, E, cap, D, seed):
    g = generator(seed)
    plan = plan_dispatch(random_choices(T, K, E, g), E, cap)
    rows = torch.randn(plan.num_rows, D, generator=g)
    tokens = torch.randn(T, D, generator=g)
    weights = torch.rand(T, K, generator=g)
    return plan, rows, tokens, weights


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@on_cpu
def test_row_primitives_match_float64(shape, in_dtype, out_dtype):
    plan, rows, tokens, weights = plan_and_rows(*shape, seed=sum(shape[:3]))
    rows, tokens = rows.to(in_dtype), tokens.to(in_dtype)
    index, pos = plan.row_token_N, plan.pos_TK
    scale = torch.rand(index.shape[0], generator=generator(1))

    for s in (None, scale):
        got = cpu_rows.gather_rows(tokens, index, s, dtype=out_dtype)
        want = tokens.double()[index] * (1 if s is None else s.double()[:, None])
        assert got.dtype == out_dtype
        torch.testing.assert_close(got.double(), want, **tolerance(out_dtype))

    kept = (pos >= 0).double()
    for w in (None, weights):
        got = cpu_rows.combine_rows(rows, pos, w, dtype=out_dtype)
        w64 = kept if w is None else w.double() * kept
        want = (rows.double()[pos.clamp(min=0)] * w64[..., None]).sum(1)
        assert got.dtype == out_dtype
        torch.testing.assert_close(got.double(), want, **tolerance(out_dtype))

    grad = tokens.to(out_dtype)  # the other operand in the other dtype
    got = cpu_rows.copy_dot_rows(rows, pos, grad)
    want = (rows.double()[pos.clamp(min=0)] * grad.double()[:, None]).sum(-1) * kept
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    assert (got[pos < 0] == 0).all()  # a dropped copy's gate gets no gradient


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@on_cpu
def test_permute_and_unpermute_on_our_kernels_match_pytorch_rows(shape, dtype):
    """The autograd functions over ``cpu_rows`` (backend ``auto`` here) against the same
    functions over ``row_ops`` (backend ``loop``), forward and both gradients, under
    bfloat16 autocast too (permute then gathers straight into bfloat16)."""
    plan, _, tokens, gates = plan_and_rows(*shape, seed=7 + sum(shape[:3]))
    T, D = tokens.shape
    scale = torch.randn(plan.num_rows, 1, generator=generator(2))  # rows differ per copy

    def run(backend):
        x = tokens.to(dtype).requires_grad_()
        g = gates.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.float32):
            x_ND = permute(x, plan, backend)
            out = unpermute(x_ND * scale.to(x_ND.dtype), g, plan, backend)
        out_grad = torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype)
        dx, dg = torch.autograd.grad(out, (x, g), out_grad) if T else (x, g)
        return x_ND.dtype, out.float(), dx.float(), dg.float()

    ours, theirs = run("auto"), run("loop")
    assert ours[0] == theirs[0] == torch.bfloat16  # the experts' dtype under autocast
    for a, b in zip(ours[1:], theirs[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=2**-7, atol=2e-2)


@pytest.mark.parametrize("T,K,E", [(64, 2, 8), (33, 1, 5), (17, 4, 6), (9, 2, 16), (0, 2, 4)])
@on_cpu
def test_counting_sort_plan_equals_the_sorting_plan(T, K, E, monkeypatch):
    ids = random_choices(T, K, E, generator(T + K + E))
    if T:
        ids[: T // 2] = ids[0]  # crowd a few experts, leave others empty
    ours = plan_dispatch(ids, E)
    with monkeypatch.context() as m:
        m.setattr(cpu_rows, "usable", lambda *tensors: False)
        theirs = plan_dispatch(ids, E)
    for field in ("row_token_N", "row_copy_N", "pos_TK", "counts_E", "offsets_E", "routed_E"):
        a, b = getattr(ours, field), getattr(theirs, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field
    assert torch.equal(plan_dispatch(ids, E, capacity=T * K).row_copy_N, theirs.row_copy_N)


@on_cpu
def test_bad_expert_ids_are_refused():
    with pytest.raises(ValueError, match="expert id 5 out of range for 4 experts"):
        cpu_rows.plan_dropless(torch.tensor([[0, 5]]), 4)
    with pytest.raises(ValueError, match="expert id -1 out of range for 4 experts"):
        cpu_rows.plan_dropless(torch.tensor([[2], [-1]]), 4)


@on_cpu
def test_pytorch_rows_cast_like_a_separate_to():
    """``row_ops``' dtype argument: gather then cast, cast then combine."""
    plan, rows, tokens, weights = plan_and_rows(11, 2, 3, None, 5, seed=3)
    got = row_ops.gather_rows(tokens, plan.row_token_N, dtype=torch.bfloat16)
    assert torch.equal(got, tokens[plan.row_token_N].bfloat16())
    got = row_ops.combine_rows(rows.bfloat16(), plan.pos_TK, weights, dtype=torch.float32)
    assert torch.equal(got, row_ops.combine_rows(rows.bfloat16().float(), plan.pos_TK, weights))
