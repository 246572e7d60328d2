"""Our Triton grouped GEMMs fed by TMA (``kernels/triton_tma.py``) against float64: on a
CPU under Triton's interpreter (TRITON_INTERPRET=1, set by conftest), on CUDA natively."""

import itertools

import pytest
import torch
from moe.kernels.backends import triton_available

from tests.reference import generator

pytestmark = pytest.mark.skipif(
    not triton_available(), reason="needs triton (TRITON_INTERPRET=1 on a CPU)"
)


def reference_groups(x, w, offsets):
    bounds = itertools.pairwise([0, *offsets.tolist()])
    return torch.cat([x[s:e].double() @ w[i].double() for i, (s, e) in enumerate(bounds)])


@pytest.mark.parametrize("transposed", [False, True], ids=["EIO", "EOI_view"])
@pytest.mark.parametrize(
    "counts",
    [[300, 0, 17, 129, 1], [0, 0, 0], [128, 128]],
    ids=["odd_groups_and_an_empty_one", "no_rows_in_any_group", "whole_tiles_only"],
)
def test_triton_persistent_forward_matches_float64(counts, transposed):
    """Four programs (on a CPU) walk every output tile of the schedule they compute from
    the offsets; a tile's rows past its group are read, never stored."""
    from moe.kernels import triton_tma

    g = generator(4)
    I, O, E = 128, 136, len(counts)  # two reduction steps; a second, partial column tile
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    n = int(offsets[-1])
    x = torch.randn(n + 5, I, generator=g).bfloat16()  # 5 rows past the groups
    shape = (E, O, I) if transposed else (E, I, O)
    w = torch.randn(shape, generator=g).bfloat16()
    w = w.transpose(1, 2) if transposed else w
    y = triton_tma.gmm_persistent(x, w, offsets)
    if y is None:
        pytest.skip("this triton has no TMA descriptors (triton < 3.4)")
    torch.testing.assert_close(
        y[:n].double(), reference_groups(x, w, offsets), rtol=1e-2, atol=1e-2
    )


@pytest.mark.parametrize(
    "counts",
    [[40, 0, 17, 65, 1], [0, 0, 0], [96]],
    ids=["odd_tails_and_an_empty_group", "no_rows_in_any_group", "whole_steps_only"],
)
def test_triton_tma_weight_gradient_matches_float64(counts):
    """The TMA-fed weight gradient (16-bit rows) reads whole 32-row steps by TMA and a
    group's last partial step by masked loads; rows of the next group, and rows past the
    groups (dropped by capacity), must not enter any sum."""
    from moe.kernels import triton_gemm, triton_tma

    g = generator(3)
    I, O = 136, 264  # over one [128 x 256] output tile in both dims; rows of 16-byte multiples
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    N = int(offsets[-1]) + 5
    x = torch.randn(N, I, generator=g).bfloat16()
    dy = torch.randn(N, O, generator=g).bfloat16()
    dw = triton_tma.gmm_wgrad_tma(x, dy, offsets)
    if dw is None:
        pytest.skip("this triton has no TMA descriptors (triton < 3.4)")
    bounds = itertools.pairwise([0, *offsets.tolist()])
    ref = torch.stack([x[s:e].double().t() @ dy[s:e].double() for s, e in bounds])
    torch.testing.assert_close(dw.double(), ref, rtol=1e-2, atol=1e-2)
    pointer = triton_gemm.gmm_wgrad_pointer(x, dy, offsets)
    torch.testing.assert_close(dw, pointer, rtol=1e-2, atol=1e-2)
