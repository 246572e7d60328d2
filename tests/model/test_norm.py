import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from moe.model import MoETransformer
from moe.model.norm import RMSNorm
from tests.small_model import small_model_config


def norms_with_weight(seed=0):
    torch.manual_seed(seed)
    ours, theirs = RMSNorm(40, eps=1e-6), nn.RMSNorm(40, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    return ours, theirs


def forward_backward(norm, x, grad):
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    y.backward(grad)
    return y, x.grad, norm.weight.grad


def test_bfloat16_autocast_matches_torch_bitwise_without_a_warning():
    ours, theirs = norms_with_weight()
    x, grad = torch.randn(33, 40).bfloat16(), torch.randn(33, 40).bfloat16()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = forward_backward(ours, x, grad)
    assert not [w for w in caught if "Mismatch dtype" in str(w.message)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own path warns here: the reason for ours
        want = forward_backward(theirs, x, grad)
    assert got[0].dtype == torch.bfloat16
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_or_wider_input_matches_a_float64_reference(dtype):
    ours, _ = norms_with_weight()
    x = torch.randn(7, 40, dtype=dtype)
    x64, w64 = x.double(), ours.weight.double()
    want = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-6) * w64
    got = ours(x)
    assert got.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_every_norm_of_the_model_is_ours():
    model = MoETransformer(small_model_config(vocab_size=50, attention="mla"))
    norms = [m for m in model.modules() if isinstance(m, nn.RMSNorm)]
    assert norms and all(type(m) is RMSNorm for m in norms)


# torch warns once per process: a fresh one, so that an earlier test cannot hide it.
MODEL_STEP = """
import torch
from moe.model import MoETransformer
from tests.small_model import small_model_config
model = MoETransformer(small_model_config(vocab_size=50))
with torch.autocast("cpu", dtype=torch.bfloat16):
    out = model(torch.randint(0, 50, (2, 12)))
out.logits.float().square().mean().backward()
"""


def test_a_bfloat16_autocast_model_step_raises_no_norm_warning():
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-c", MODEL_STEP]
    run = subprocess.run(command, cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "Mismatch dtype" not in run.stderr
