"""The load-balancing loss in each ``MoEConfig.balance`` mode against a naive per-token
reference in float64 (value and router-weight gradient), and the gate scale."""

import pytest
import torch

from moe.layers import MoEConfig, MoELayer, Router


def naive_balance_loss(x_TD, weight_ED, top_k, groups, load_E=None):
    """``E * sum_i f_i * P_i`` averaged over ``groups`` (lists of token indices), token by
    token; ``load_E`` replaces the groups' own f (global balancing)."""
    E = weight_ED.shape[0]
    total = 0.0
    for group in groups:
        counts = [0.0] * E
        probs = [0.0] * E
        for t in group:
            p = torch.softmax(weight_ED @ x_TD[t], dim=0)
            for i in torch.topk(p.detach(), top_k).indices.tolist():
                counts[i] += 1.0
            for i in range(E):
                probs[i] = probs[i] + p[i] / len(group)
        if load_E is not None:
            counts = [float(c) for c in load_E]
        f = [c / sum(counts) for c in counts]
        total = total + E * sum(f[i] * probs[i] for i in range(E))
    return total / len(groups)


@pytest.mark.parametrize("top_k", [1, 3])
@pytest.mark.parametrize("balance", ["micro", "sequence", "global"])
def test_each_balance_mode_equals_the_naive_loss(balance, top_k):
    torch.manual_seed(0)
    B, S, D, E = 3, 7, 6, 5
    layer = MoELayer(D, MoEConfig(num_experts=E, top_k=top_k, d_ff=4, balance=balance))
    layer.double()
    x = torch.randn(B, S, D, dtype=torch.float64)
    load_E = torch.tensor([9, 0, 4, 30, 2]) if balance == "global" else None
    _, aux = layer(x, load_E)
    (grad,) = torch.autograd.grad(aux.aux_loss, layer.router.weight_ED)

    weight = layer.router.weight_ED.detach().clone().requires_grad_(True)
    tokens = list(range(B * S))
    groups = [tokens[b * S : (b + 1) * S] for b in range(B)] if balance == "sequence" else [tokens]
    expected = naive_balance_loss(x.reshape(B * S, D), weight, top_k, groups, load_E)
    (expected_grad,) = torch.autograd.grad(expected, weight)
    torch.testing.assert_close(aux.aux_loss, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_global_without_loads_balances_over_its_own_tokens():
    torch.manual_seed(1)
    x = torch.randn(40, 8)
    config = MoEConfig(num_experts=4, balance="global")
    router = Router(8, config)
    micro = Router(8, MoEConfig(num_experts=4, balance="micro"))
    micro.load_state_dict(router.state_dict())
    torch.testing.assert_close(router(x).aux_loss, micro(x).aux_loss)
    # Uniform loads: f_i = 1/E, so the loss is sum_i P_i = 1 and pushes nothing.
    assert router(x, load_E=torch.ones(4)).aux_loss.item() == pytest.approx(1.0)


def test_gate_scale_multiplies_the_combine_weights():
    torch.manual_seed(2)
    base = MoELayer(8, MoEConfig(num_experts=4, top_k=2, d_ff=6))
    scaled = MoELayer(8, MoEConfig(num_experts=4, top_k=2, d_ff=6, gate_scale=2.5))
    scaled.load_state_dict(base.state_dict())
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(scaled(x)[0], 2.5 * base(x)[0])
    with pytest.raises(ValueError, match="gate_scale must be > 0"):
        MoEConfig(gate_scale=0.0)
    with pytest.raises(ValueError, match="balance must be one of"):
        MoEConfig(balance="batch")
