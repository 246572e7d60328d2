import pytest
import torch
import torch.nn.functional as F
from moe.kernels import cpu_activation
from moe.kernels.cpu_gemm import avx512_available

from moe.layers.ffn import activate
from tests.reference import generator, on_cpu

pytestmark = pytest.mark.skipif(
    not avx512_available(), reason="the kernels need a CPU with AVX512-BF16 and a C++ compiler"
)


def reference(h, da):
    """SwiGLU and its input gradient in float64 by PyTorch's operations."""
    h64 = h.double().requires_grad_()
    gate, up = h64.chunk(2, dim=-1)
    a = F.silu(gate) * up
    a.backward(da.double())
    return a.detach(), h64.grad


@on_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("shape", [(37, 2 * 45), (4, 3, 2 * 16), (1, 2), (0, 8)])
def test_swiglu_matches_float64(shape, dtype):
    """Forward and input gradient against float64 on the same inputs: float32 to its own
    rounding; bfloat16 to one rounding of the result (2^-8 relative), where PyTorch's
    operations round twice forward and three times backward. Large gates of both signs
    saturate the sigmoid (exp overflows to inf or underflows to 0), odd widths leave a
    partial vector."""
    g = generator(sum(shape))
    h = (4 * torch.randn(shape, generator=g)).to(dtype)
    if h.numel():
        h.view(-1, shape[-1])[0, 0], h.view(-1, shape[-1])[-1, 0] = 120.0, -120.0
    da = torch.randn(*shape[:-1], shape[-1] // 2, generator=g).to(dtype)
    hg = h.clone().requires_grad_()
    a = cpu_activation.swiglu(hg)
    a.backward(da)
    a_ref, dh_ref = reference(h, da)
    assert a.dtype == dtype and a.shape == a_ref.shape and hg.grad.dtype == dtype
    rtol = 2**-8 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(a.double(), a_ref, rtol=rtol, atol=1e-6)
    # The gradient's parts are products: one rounding each, relative to their own size.
    torch.testing.assert_close(hg.grad.double(), dh_ref, rtol=rtol, atol=1e-6)


@on_cpu
def test_activate_takes_the_kernel_in_eager_and_matches_pytorch():
    h = torch.randn(64, 2 * 40, generator=generator(2)).bfloat16().requires_grad_()
    a = activate(h, "swiglu")
    assert a.grad_fn.name() == "_SwiGLUBackward"
    gate, up = h.detach().float().chunk(2, dim=-1)
    torch.testing.assert_close(a.float(), F.silu(gate) * up, rtol=2**-7, atol=1e-3)


@on_cpu
def test_non_contiguous_input():
    h = torch.randn(2 * 24, 10, generator=generator(3)).t()  # [10, 48], column-major
    a = cpu_activation.swiglu(h)
    torch.testing.assert_close(a, F.silu(h[:, :24]) * h[:, 24:], rtol=1e-6, atol=1e-6)
