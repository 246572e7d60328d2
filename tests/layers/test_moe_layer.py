"""The MoE layer against the per-token loop reference: forward and every gradient."""

import pytest
import torch
import torch.nn.functional as F_
from moe.kernels import expert_capacity, torch_gmm_supports
from moe.kernels.backends import triton_available
from moe.kernels.cpu_gemm import avx512_available
from moe.kernels.cpu_gemm_avx2 import avx2_available

from moe.layers import FeedForward, MoEConfig, MoELayer
from tests.reference import on_cpu, reference_moe

BACKENDS = ["loop", "torch", "auto"] + (["triton"] if triton_available() else [])
# Our CPU kernels, where this machine runs them.
CPU_KERNELS = ["avx512"] if avx512_available() else []
CPU_KERNELS += ["avx2"] if avx2_available() else []
BACKENDS += CPU_KERNELS if torch.get_default_device().type == "cpu" else []

# (T, D, F, E): random tokens, a single token, zero tokens, many experts for few tokens
# (most empty), odd sizes.
SHAPES = {
    "random": (24, 16, 8, 6),
    "single_token": (1, 16, 8, 4),
    "zero_tokens": (0, 16, 8, 4),
    "mostly_empty_experts": (3, 8, 4, 16),
    "odd_sizes": (11, 13, 7, 5),
}


def build(
    backend,
    T,
    D,
    F,
    E,
    k,
    capacity_factor,
    dtype,
    activation="swiglu",
    gate_mode="switch",
    priority="sequence",
    seed=0,
):
    torch.manual_seed(seed)
    cfg = MoEConfig(
        num_experts=E,
        top_k=k,
        d_ff=F,
        capacity_factor=capacity_factor,
        capacity_priority=priority,
        gate_mode=gate_mode,
        activation=activation,
        backend=backend,
    )
    layer = MoELayer(D, cfg).to(dtype)
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    return layer, x


def params_of(layer):
    return [layer.router.weight_ED, layer.experts.w_in_EHD, layer.experts.w_out_EDF]


def check_against_reference(
    layer,
    x,
    k,
    capacity_factor,
    tol,
    activation="swiglu",
    gate_mode="switch",
    priority="sequence",
    **route,
):
    """``route``: the reference's routing options (score, groups, gate scale, bias)."""
    T = x.shape[0]
    E = layer.config.num_experts
    y, aux = layer(x)

    ref_params = [p.detach().double().requires_grad_() for p in params_of(layer)]
    xr = x.detach().double().requires_grad_()
    cap = None if capacity_factor <= 0 else expert_capacity(capacity_factor, T, k, E)
    y_ref, aux_ref, z_ref, kept = reference_moe(
        xr,
        *ref_params,
        top_k=k,
        activation=activation,
        gate_mode=gate_mode,
        capacity=cap,
        priority=priority,
        **route,
    )
    torch.testing.assert_close(y.double(), y_ref, **tol)
    assert aux.kept_E.sum().item() == len(kept)
    if T == 0:
        assert y.shape == (0, x.shape[1])
        return
    torch.testing.assert_close(aux.aux_loss.double(), aux_ref, **tol)
    torch.testing.assert_close(aux.z_loss.double(), z_ref, **tol)
    assert aux.dropped_fraction.item() == pytest.approx(1 - len(kept) / (T * k))

    # Every gradient: input, router weight, every expert weight, through y and both losses.
    g = torch.randn_like(y)
    loss = (y * g).sum() + 0.3 * aux.aux_loss + 0.1 * aux.z_loss
    loss_ref = (y_ref * g.double()).sum() + 0.3 * aux_ref + 0.1 * z_ref
    grads = torch.autograd.grad(loss, [x, *params_of(layer)])
    grads_ref = torch.autograd.grad(loss_ref, [xr, *ref_params])
    for name, a, b in zip(["x", "router", "w_in", "w_out"], grads, grads_ref, strict=True):
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m, n=name: f"grad {n}: {m}")


def dtype_and_tol(backend, D, F):
    if backend == "loop":
        return torch.float64, {"rtol": 1e-9, "atol": 1e-9}
    return torch.float32, {"rtol": 1e-4, "atol": 1e-5}


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0], ids=["dropless", "capacity"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_matches_per_token_reference(backend, shape, k, capacity_factor):
    T, D, F, E = SHAPES[shape]
    if k > E:
        pytest.skip("top_k > num_experts")
    dtype, tol = dtype_and_tol(backend, D, F)
    layer, x = build(backend, T, D, F, E, k, capacity_factor, dtype, seed=T + k)
    if backend == "torch" and not torch_gmm_supports(x, torch.empty(1, D, 2 * F, dtype=dtype)):
        pytest.skip("torch.nn.functional.grouped_mm needs 16-byte aligned dims")
    check_against_reference(layer, x, k, capacity_factor, tol)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("gate_mode", ["switch", "renormalize"])
def test_activations_and_gate_modes(activation, gate_mode):
    layer, x = build("loop", 20, 12, 10, 5, 2, 0.0, torch.float64, activation, gate_mode)
    check_against_reference(layer, x, 2, 0.0, {"rtol": 1e-9, "atol": 1e-9}, activation, gate_mode)


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0], ids=["dropless", "capacity"])
@pytest.mark.parametrize("n_group, topk_group", [(1, 1), (4, 2), (3, 1)])
@pytest.mark.parametrize("gate_mode", ["switch", "renormalize"])
def test_sigmoid_group_limited_routing(gate_mode, n_group, topk_group, capacity_factor):
    """DeepSeek-V3 routing: sigmoid scores, a selection bias, the best groups first, scaled
    gates; float64 against the per-token reference, forward and every gradient."""
    torch.manual_seed(n_group + topk_group)
    E, k = 12, 2
    cfg = MoEConfig(
        num_experts=E,
        top_k=k,
        d_ff=6,
        score="sigmoid",
        gate_mode=gate_mode,
        n_group=n_group,
        topk_group=topk_group,
        gate_scale=2.5,
        expert_bias=True,
        capacity_factor=capacity_factor,
        backend="loop",
    )
    layer = MoELayer(10, cfg).double()
    with torch.no_grad():
        layer.router.expert_bias_E.uniform_(-0.3, 0.3)
    x = torch.randn(23, 10, dtype=torch.float64, requires_grad=True)
    route = dict(score="sigmoid", n_group=n_group, topk_group=topk_group, gate_scale=2.5)
    bias = layer.router.expert_bias_E
    tol = {"rtol": 1e-9, "atol": 1e-9}
    check_against_reference(
        layer, x, k, capacity_factor, tol, gate_mode=gate_mode, expert_bias=bias, **route
    )
    if n_group > 1:  # every token's experts lie in at most topk_group groups
        ids = layer.router(x).ids_TK // (E // n_group)
        assert all(len(set(row)) <= topk_group for row in ids.tolist())


def test_gate_priority_capacity():
    layer, x = build("loop", 30, 12, 6, 4, 2, 0.75, torch.float64, priority="gate")
    check_against_reference(layer, x, 2, 0.75, {"rtol": 1e-9, "atol": 1e-9}, priority="gate")


@pytest.mark.parametrize("k", [1, 2])
def test_all_tokens_to_one_expert(k):
    layer, _ = build("auto", 0, 8, 4, 4, k, 1.0, torch.float64)
    with torch.no_grad():  # positive inputs and strictly ordered rows: expert 0 wins, then 1
        layer.router.weight_ED.copy_(torch.arange(4, 0, -1.0).unsqueeze(1).expand(4, 8))
    x = torch.rand(10, 8, dtype=torch.float64, requires_grad=True) + 0.1
    y, aux = layer(x)
    assert aux.routed_E.tolist() == [10, 10 if k == 2 else 0, 0, 0]
    cap = expert_capacity(1.0, 10, k, 4)
    assert aux.kept_E.tolist()[:k] == [min(10, cap)] * k
    check_against_reference(layer, x, k, 1.0, {"rtol": 1e-9, "atol": 1e-9})


def test_one_expert_top1_equals_dense_ffn():
    torch.manual_seed(0)
    layer = MoELayer(16, MoEConfig(num_experts=1, top_k=1, d_ff=24))
    dense = FeedForward(16, 24)
    with torch.no_grad():
        dense.w_in.weight.copy_(layer.experts.w_in_EHD[0])
        dense.w_out.weight.copy_(layer.experts.w_out_EDF[0])
    x = torch.randn(2, 9, 16, requires_grad=True)
    y, _ = layer(x)
    y_dense = dense(x)
    torch.testing.assert_close(y, y_dense)
    g = torch.randn_like(y)
    torch.testing.assert_close(
        torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_dense, x, g)[0]
    )


def test_expert_init_matches_dense_ffn_statistics():
    layer = MoELayer(64, MoEConfig(num_experts=32, d_ff=96))
    dense = FeedForward(64, 96)
    for moe_w, dense_w in [
        (layer.experts.w_in_EHD, dense.w_in.weight),
        (layer.experts.w_out_EDF, dense.w_out.weight),
    ]:
        assert moe_w.abs().max() <= dense_w.abs().max() * 1.01
        assert moe_w.std().item() == pytest.approx(dense_w.std().item(), rel=0.05)


def test_uniform_routing_gives_unit_aux_loss():
    layer = MoELayer(8, MoEConfig(num_experts=4, top_k=2, d_ff=4))
    with torch.no_grad():
        layer.router.weight_ED.zero_()  # equal probabilities; topk breaks ties by index
    x = torch.randn(12, 8)
    _, aux = layer(x)
    assert aux.aux_loss.item() == pytest.approx(1.0)  # E * sum(f_i * 1/E) = 1 whatever f
    assert aux.entropy.item() == pytest.approx(torch.log(torch.tensor(4.0)).item())


@on_cpu
def test_bfloat16_autocast_keeps_router_in_float32():
    layer = MoELayer(16, MoEConfig(num_experts=4, top_k=2, d_ff=8))
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(x)
    assert y.dtype == torch.bfloat16
    assert aux.aux_loss.dtype == torch.float32
    y32, _ = layer(x)
    torch.testing.assert_close(y.float(), y32, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0], ids=["dropless", "capacity"])
@pytest.mark.parametrize("ours", CPU_KERNELS)
@on_cpu
def test_cpu_kernels_under_autocast_match_the_loop_backend(ours, capacity_factor):
    """How bfloat16 training runs on the CPU: float32 weights, autocast. Our kernels and
    the per-expert matmuls differ only in summation order and bfloat16 rounding."""
    T, D, F, E, k = 70, 48, 40, 6, 2
    layers = {}
    for backend in (ours, "loop"):
        layers[backend], x = build(backend, T, D, F, E, k, capacity_factor, torch.float32)
    layers["loop"].load_state_dict(layers[ours].state_dict())
    g = torch.randn(T, D)
    results = {}
    for backend, layer in layers.items():
        xb = x.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, aux = layer(xb)
        loss = (y.float() * g).sum() + 0.3 * aux.aux_loss
        results[backend] = [y.float(), *torch.autograd.grad(loss, [xb, *params_of(layer)])]
    for name, a, b in zip(["y", "x", "router", "w_in", "w_out"], *results.values(), strict=True):
        scale = b.abs().max().item()
        tol = {"rtol": 2e-2, "atol": 2e-2 * scale}
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("gated", [False, True])
def test_shared_expert_matches_the_per_token_reference(gated):
    """Routed experts plus a shared SwiGLU expert (optionally behind a sigmoid gate, as
    Qwen2-MoE), float64, forward and every gradient against the per-token loop."""
    torch.manual_seed(3)
    T, D, F, S, E, k = 13, 8, 6, 10, 5, 2
    cfg = MoEConfig(num_experts=E, top_k=k, d_ff=F, shared_d_ff=S, shared_gate=gated)
    layer = MoELayer(D, cfg).double()
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    params = dict(layer.named_parameters())
    x_ref = x.detach().clone().requires_grad_()
    ref = {name: p.detach().clone().requires_grad_() for name, p in params.items()}
    y_ref, aux_ref, _, _ = reference_moe(
        x_ref, ref["router.weight_ED"], ref["experts.w_in_EHD"], ref["experts.w_out_EDF"], top_k=k
    )
    gate_up = x_ref @ ref["shared.w_in.weight"].t()
    shared = (F_.silu(gate_up[:, :S]) * gate_up[:, S:]) @ ref["shared.w_out.weight"].t()
    if gated:
        shared = shared * torch.sigmoid(x_ref @ ref["shared_gate.weight"].t())
    y_ref = y_ref + shared
    torch.testing.assert_close(y, y_ref)
    probe = torch.randn_like(y)
    ((y * probe).sum() + aux.aux_loss).backward()
    ((y_ref * probe).sum() + aux_ref).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for name, p in params.items():
        torch.testing.assert_close(p.grad, ref[name].grad, msg=name)
