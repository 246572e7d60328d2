"""``torch.compile`` of the MoE layer and of a whole block: one graph (zero graph breaks,
``fullgraph=True``), equal to eager in the forward and in every gradient."""

import pytest
import torch
import torch._dynamo
from moe.kernels import cpu_rows, triton_available

from moe.layers import MoEConfig, MoELayer
from moe.model.transformer import Block, rotary_tables
from tests.small_model import small_model_config

# (capacity factor, priority): dropless, tight Switch capacity, batch-prioritized capacity.
ROUTINGS = [(0.0, "sequence"), (1.0, "sequence"), (0.75, "gate")]
# aot_eager reruns eager's kernels, so compiled equals eager exactly, except where eager's
# router and dispatch rows run our CPU kernels (kernels/cpu_router.py, cpu_rows.py; a trace
# takes PyTorch's): their float32 sums add in another order, equal to float32 rounding.
SAME = 1e-6 if cpu_rows.usable(torch.zeros(1)) else 0.0


def layer_and_input(capacity_factor, priority, top_k, seed=0, backend="auto"):
    torch.manual_seed(seed)
    cfg = MoEConfig(
        num_experts=6,
        top_k=top_k,
        d_ff=24,
        capacity_factor=capacity_factor,
        capacity_priority=priority,
        backend=backend,
    )
    return MoELayer(16, cfg), torch.randn(3, 10, 16, requires_grad=True)


def loss_and_grads(module, x, *args):
    module.zero_grad()
    x.grad = None
    y, aux = module(x, *args)
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + aux.aux_loss + aux.z_loss
    loss.backward()
    grads = {
        name.removeprefix("_orig_mod."): p.grad.clone() for name, p in module.named_parameters()
    }
    return y.detach(), aux, x.grad.clone(), grads


def assert_same(eager, compiled, atol):
    y, aux, dx, grads = eager
    y_c, aux_c, dx_c, grads_c = compiled
    torch.testing.assert_close(y_c, y, atol=atol, rtol=atol)
    torch.testing.assert_close(aux_c.aux_loss, aux.aux_loss, atol=atol, rtol=atol)
    assert torch.equal(aux_c.kept_E, aux.kept_E)
    torch.testing.assert_close(dx_c, dx, atol=atol, rtol=atol)
    assert grads.keys() == grads_c.keys()
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], atol=atol, rtol=atol)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity_factor,priority", ROUTINGS)
def test_layer_is_one_graph_equal_to_eager(capacity_factor, priority, top_k):
    layer, x = layer_and_input(capacity_factor, priority, top_k)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    eager = loss_and_grads(layer, x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert_same(eager, loss_and_grads(compiled, x), atol=SAME)
    if capacity_factor > 0:
        assert eager[1].dropped_fraction > 0  # the capacity path was exercised


@pytest.mark.skipif(not triton_available(), reason="needs triton (TRITON_INTERPRET=1 on a CPU)")
@pytest.mark.parametrize("capacity_factor,priority", ROUTINGS[:2])
def test_layer_on_the_triton_backend_is_one_graph_equal_to_eager(capacity_factor, priority):
    """Our Triton kernels are custom ops, so the trace never enters them; the layer's
    choice of them must trace too (torch 2.11 refused to trace a lookup of the package)."""
    layer, x = layer_and_input(capacity_factor, priority, top_k=2, backend="triton")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    eager = loss_and_grads(layer, x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert_same(eager, loss_and_grads(compiled, x), atol=SAME)


@pytest.mark.parametrize("top_k", [1, 2])
def test_compiled_dropless_layer_on_grouped_mm_matches_eager(top_k):
    """Compiled, a dropless bfloat16 layer on the ``torch`` backend calls grouped_mm itself
    and takes the compiler's backward for it; eager runs our autograd.Function."""
    layer, x = layer_and_input(0.0, "sequence", top_k, backend="torch")
    layer, x = layer.bfloat16(), x.detach().bfloat16().requires_grad_()
    torch._dynamo.reset()
    eager = loss_and_grads(layer, x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    graph = torch._dynamo.explain(layer)(x).graphs[0]
    called = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert any("grouped_mm" in name for name in called), called
    assert not any("moe.gmm" in name for name in called), called
    assert_same(eager, loss_and_grads(compiled, x), atol=2e-2)


class Autocast(torch.nn.Module):
    """The layer under bfloat16 autocast, as the trainer runs it (moe/train/loss.py)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.layer(x)


@pytest.mark.parametrize("capacity_factor,priority", ROUTINGS[:2])
def test_compiled_layer_under_autocast_matches_eager(capacity_factor, priority):
    """Under autocast permute gathers float32 tokens into bfloat16 rows and hands back a
    float32 gradient; compiled, the same (to bfloat16 rounding: eager's CPU kernels and the
    compiled PyTorch ops round in different places)."""
    layer, x = layer_and_input(capacity_factor, priority, top_k=2)
    model = Autocast(layer)
    torch._dynamo.reset()
    eager = loss_and_grads(model, x)
    assert eager[0].dtype == torch.bfloat16 and eager[2].dtype == torch.float32
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_same(eager, loss_and_grads(compiled, x), atol=2e-2)


def test_block_is_one_graph_equal_to_eager():
    torch.manual_seed(0)
    cfg = small_model_config(moe={"num_experts": 4, "top_k": 2, "d_ff": 16, "capacity_factor": 1.0})
    block = Block(cfg, 0)
    cos, sin = rotary_tables(16, cfg.head_dim, cfg.rope_theta)
    x = torch.randn(2, 16, cfg.d_model, requires_grad=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x, cos, sin)
    assert explained.graph_break_count == 0, explained.break_reasons
    eager = loss_and_grads(block, x, cos, sin)
    # aot_eager reruns the same kernels, so the CPU demands equality; on CUDA it replays a
    # view of an attention gradient whose strides its trace got wrong (pytorch/pytorch#120035),
    # so there the block compiles as users get it, with inductor, to rounding.
    cuda = x.is_cuda
    compiled = torch.compile(block, fullgraph=True, backend="inductor" if cuda else "aot_eager")
    assert_same(eager, loss_and_grads(compiled, x, cos, sin), atol=1e-5 if cuda else SAME)


@pytest.mark.slow
@pytest.mark.parametrize("capacity_factor,priority", ROUTINGS[:2])
def test_layer_compiled_by_inductor_matches_eager(capacity_factor, priority):
    layer, x = layer_and_input(capacity_factor, priority, top_k=2)
    torch._dynamo.reset()
    eager = loss_and_grads(layer, x)
    compiled = torch.compile(layer, fullgraph=True)  # inductor: generated C++ on the CPU
    assert_same(eager, loss_and_grads(compiled, x), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the GPU machine)")
@pytest.mark.parametrize("capacity_factor,priority", ROUTINGS)
def test_layer_never_waits_for_the_gpu(capacity_factor, priority):
    """Forward and backward without one device-to-host synchronisation."""
    layer, x = layer_and_input(capacity_factor, priority, top_k=2)
    layer, x = layer.cuda().bfloat16(), x.detach().cuda().bfloat16().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, aux = layer(x)
        (y.float().sum() + aux.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
