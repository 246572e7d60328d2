import pytest
import torch

from moe.layers import MoEConfig, MoELayer, Router
from tests.reference import reference_moe


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
