import copy

import pytest
import torch
import torch.nn.functional as F
from moe.kernels import cpu_gemm, cpu_router

from moe.layers import MoEConfig, MoELayer, Router
from tests.reference import on_cpu, reference_moe


def test_expert_bias_steers_selection_but_not_gates():
    torch.manual_seed(0)
    layer = MoELayer(8, MoEConfig(num_experts=4, top_k=2, d_ff=6, expert_bias=True, backend="loop"))
    layer.double()
    with torch.no_grad():
        layer.router.expert_bias_E.copy_(torch.tensor([0.5, 0.0, -0.5, 0.0]))
    x = torch.randn(16, 8, dtype=torch.float64)
    y, aux = layer(x)
    assert aux.routed_E[0].item() == 16  # a +0.5 bias beats any probability gap
    params = [layer.router.weight_ED, layer.experts.w_in_EHD, layer.experts.w_out_EDF]
    y_ref, *_ = reference_moe(x, *params, top_k=2, expert_bias=layer.router.expert_bias_E)
    torch.testing.assert_close(y, y_ref)


def test_update_expert_bias_raises_underloaded_experts():
    router = Router(4, MoEConfig(num_experts=3, expert_bias=True))
    router.update_expert_bias(torch.tensor([10, 1, 1]), rate=0.1)
    torch.testing.assert_close(router.expert_bias_E, torch.tensor([-0.1, 0.1, 0.1]))
    with pytest.raises(RuntimeError, match="expert_bias=True"):
        Router(4, MoEConfig(num_experts=3)).update_expert_bias(torch.tensor([1, 1, 1]))


def test_jitter_only_in_training():
    router = Router(8, MoEConfig(num_experts=4, jitter=0.5))
    x = torch.randn(64, 8)
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.gates_TK, b.gates_TK)
    router.train()
    torch.manual_seed(1)
    c = router(x)
    assert not torch.equal(a.gates_TK, c.gates_TK)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_experts": 0}, "num_experts must be >= 1"),
        ({"num_experts": 4, "top_k": 5}, "top_k must be between 1 and num_experts"),
        ({"d_ff": 0}, "d_ff must be >= 1"),
        ({"jitter": 1.5}, "jitter must be in"),
        ({"activation": "tanh"}, "activation must be one of"),
        ({"gate_mode": "softmax"}, "gate_mode must be one of"),
        ({"capacity_priority": "random"}, "capacity_priority must be one of"),
        ({"backend": "cutlass"}, "backend must be one of"),
        ({"score": "relu"}, "score must be one of"),
        ({"num_experts": 8, "n_group": 3}, "n_group must divide num_experts"),
        ({"num_experts": 8, "n_group": 4, "topk_group": 5}, "topk_group must be between"),
        ({"num_experts": 8, "top_k": 3, "n_group": 4}, "raise topk_group"),
    ],
)
def test_invalid_config_fails_with_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**kwargs)


# (score, gate_mode, gate_scale, expert bias, balance, E, K): every setting the CPU kernel
# takes (kernels/cpu_router.py), with odd expert counts and every top-k up to 4.
FUSED_SETTINGS = [
    ("softmax", "switch", 1.0, False, "micro", 8, 2),
    ("softmax", "renormalize", 2.5, False, "micro", 5, 1),
    ("sigmoid", "switch", 1.0, True, "global", 8, 2),
    ("sigmoid", "renormalize", 1.0, True, "micro", 7, 4),
    ("softmax", "switch", 0.5, True, "global", 64, 3),  # float32 weight: our float32 GEMMs
    ("sigmoid", "switch", 1.0, False, "micro", 32, 2),  # the most of our float32 logits kernel
]


# (rows, weight): float32; bfloat16 rows as autocast gives them (a float32 weight); a
# bfloat16 model (both bfloat16: the logits on our bfloat16 GEMM, still float32).
DTYPES = {
    "f32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.float32),
    "bf16-weight": (torch.bfloat16, torch.bfloat16),
}


@on_cpu
@pytest.mark.skipif(
    not cpu_router.usable(torch.zeros(1, 1)), reason="needs our CPU kernels (AVX512-BF16)"
)
@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("setting", FUSED_SETTINGS, ids=lambda s: "-".join(map(str, s)))
def test_cpu_kernel_router_matches_float64(setting, dtypes):
    """The router on our CPU kernels against the PyTorch path in float64 on the same weights
    and rows (the logits float32 in every pairing): choices, gates, both losses, the
    statistics, and every gradient."""
    rows, weight = dtypes
    score, gate_mode, gate_scale, bias, balance, E, K = setting
    cfg = MoEConfig(
        num_experts=E,
        top_k=K,
        score=score,
        gate_mode=gate_mode,
        gate_scale=gate_scale,
        expert_bias=bias,
        balance=balance,
    )
    torch.manual_seed(E + K)
    router = Router(24, cfg)
    if bias:
        with torch.no_grad():
            router.expert_bias_E.copy_(torch.randn(E) * 0.05)
    router.weight_ED.data = router.weight_ED.data.to(weight)
    reference = copy.deepcopy(router).double()
    x = torch.randn(301, 24).to(rows)  # past one 256-token block of the kernel's sums
    load = torch.randint(1, 50, (E,)) if balance == "global" else None

    def run(module, inputs):
        inputs = inputs.clone().requires_grad_()
        out = module(inputs, load_E=load)
        weights = torch.linspace(-1, 1, out.gates_TK.numel()).view_as(out.gates_TK)
        loss = (out.gates_TK * weights.to(out.gates_TK)).sum() + 3 * out.aux_loss + 5 * out.z_loss
        loss.backward()
        return out, inputs.grad, module.weight_ED.grad

    assert router._fused(x)  # the kernel runs here
    out, dx, dw = run(router, x)
    ref, ref_dx, ref_dw = run(reference, x.double())
    assert torch.equal(out.ids_TK, ref.ids_TK)
    assert torch.equal(out.routed_E, ref.routed_E)
    for a, b in [
        (out.gates_TK, ref.gates_TK),
        (out.aux_loss, ref.aux_loss),
        (out.z_loss, ref.z_loss),
        (out.entropy, ref.entropy),
    ]:
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
    # Gradients in their tensor's dtype: one rounding to bfloat16 at the end.
    for grad, ref_grad in [(dx, ref_dx), (dw, ref_dw)]:
        tight = grad.dtype == torch.float32
        close = {"rtol": 1e-5, "atol": 1e-6} if tight else {"rtol": 2**-8, "atol": 1e-5}
        torch.testing.assert_close(grad.double(), ref_grad, **close)
    assert (dx.dtype, dw.dtype) == dtypes


@on_cpu
@pytest.mark.skipif(
    not cpu_router.usable(torch.zeros(1, 1)), reason="needs our CPU kernels (AVX512-BF16)"
)
@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_cpu_kernel_router_with_huge_logits_matches_pytorch(score, monkeypatch):
    """Logits of +-300 (a diverging run): scores saturate in float32 exactly as PyTorch's
    float32 path saturates them (float64 would still tell them apart), with no NaN or
    infinity from the kernel's exps. Saturated scores tie, and ties may be chosen in
    another order: the chosen scores agree, and each is its expert's score."""
    torch.manual_seed(0)
    router = Router(16, MoEConfig(num_experts=6, top_k=2, score=score))
    with torch.no_grad():
        router.weight_ED.mul_(300.0)
    x = torch.randn(40, 16)
    out = router(x)
    monkeypatch.setattr(cpu_router, "usable", lambda *tensors: False)
    ref = router(x)
    assert torch.isfinite(out.gates_TK).all() and torch.isfinite(out.z_loss)
    torch.testing.assert_close(out.gates_TK, ref.gates_TK, rtol=1e-5, atol=1e-6)
    logits = F.linear(x, router.weight_ED).detach()
    scores = torch.sigmoid(logits) if score == "sigmoid" else torch.softmax(logits, -1)
    torch.testing.assert_close(out.gates_TK, scores.gather(1, out.ids_TK), rtol=1e-5, atol=1e-6)
    # The balancing loss of the kernel's own choices (the expert shares follow the choices).
    probs = scores / scores.sum(-1, keepdim=True)
    shares = out.routed_E.float() / out.routed_E.sum()
    torch.testing.assert_close(
        out.aux_loss, 6 * (shares * probs.mean(0)).sum(), rtol=1e-5, atol=1e-6
    )
    for a, b in [(out.z_loss, ref.z_loss), (out.entropy, ref.entropy)]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@on_cpu
@pytest.mark.skipif(
    not cpu_router.usable(torch.zeros(1, 1)), reason="needs our CPU kernels (AVX512-BF16)"
)
@pytest.mark.parametrize("rows", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, D", [(1, 3), (7, 24), (8, 16), (259, 40)])
def test_cpu_float32_router_linear_matches_float64(T, D, rows):
    """The float32 linear kernels under the router (a float32 weight, rows as autocast gives
    them): the logits and both gradients against float64, at every expert count up to the
    kernel's limit that changes its register blocks (one 16-expert vector or two, a partial
    last one), row counts around its 8-row blocks and widths past the 16-lane tails."""
    kernels = cpu_gemm.module()
    g = torch.Generator().manual_seed(T + D)
    for E in (1, 8, 15, 16, 17, 31, kernels.router_linear_experts):
        x = torch.randn(T, D, generator=g).to(rows)
        w = torch.randn(E, D, generator=g)
        dl = torch.randn(T, E, generator=g)
        logits = kernels.router_logits(x, w)
        dx, dw = kernels.router_linear_backward(x, w, dl)
        x64, w64, dl64 = x.double(), w.double(), dl.double()

        def sums_close(got, a, b):
            """float32 sums of a @ b: off by a few float32 roundings of the summed magnitudes."""
            err = (got.double() - a @ b).abs()
            assert (err <= (a.abs() @ b.abs()) * 2**-20 + 1e-30).all(), err.max()

        sums_close(logits, x64, w64.T)
        sums_close(dw, dl64.T, x64)
        if rows == torch.float32:
            sums_close(dx, dl64, w64)
        else:  # dx in the rows' dtype: one rounding to bfloat16
            torch.testing.assert_close(dx, (dl64 @ w64).to(rows), rtol=2**-7, atol=1e-5)
        assert (logits.dtype, dx.dtype, dw.dtype) == (torch.float32, rows, torch.float32)
