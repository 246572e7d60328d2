"""Grouped GEMM with autograd over interchangeable backends.

Shape legend: N rows in expert order, E experts, I inner dim, O output dim.

``grouped_mm(x_NI, w_EIO, offsets_E)`` multiplies each expert's group of rows by that
expert's matrix. Backward: ``dx = grouped_mm(dy, w^T)`` and ``dw[e] = x[g]^T dy[g]``.
When ``w`` is a transposed view of a contiguous ``[E, O, I]`` weight (the
``nn.Linear``/Hugging Face layout), the weight gradient is computed as ``dy^T x`` so that
it comes out in the parameter's own layout and autograd needs no extra copy.

Both primitives are ``torch.library`` custom ops (``moe::gmm``, ``moe::gmm_wgrad``) with
fake implementations: ``torch.compile`` sees one opaque node of known output shape and
traces the layer around it without a graph break, whatever the backend does inside (the
CPU loop reads the group sizes on the host; that stays inside the op). Eager calls go
through an ``autograd.Function`` over the same functions instead: the custom-op
dispatcher's Python wrapping is host time that a GPU waits for. A compiled dropless layer
on the ``torch`` backend (what ``auto`` picks on recent GPUs) calls
``torch.nn.functional.grouped_mm`` itself: the compiler knows that op and its backward, so
the compiled step runs no Python for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import AVX2, AVX512, TORCH, resolve_backend, torch_gmm_supports


def _gmm(x_NI: Tensor, w_EIO: Tensor, offsets_E: Tensor, backend: str, zero_tail: bool) -> Tensor:
    return resolve_backend(backend, x_NI, w_EIO).gmm(x_NI, w_EIO, offsets_E, zero_tail)


def _wgrad(x_NI: Tensor, dy_NO: Tensor, offsets_E: Tensor, backend: str, **out_dtype) -> Tensor:
    """``out_dtype``: only for a float32 weight with bfloat16 rows (our CPU kernels, eager)."""
    resolved = resolve_backend(backend, x_NI, dy_NO.unsqueeze(0))
    return resolved.gmm_wgrad(x_NI, dy_NO, offsets_E, **out_dtype)


def _gmm_wgrad(x_NI: Tensor, dy_NO: Tensor, offsets_E: Tensor, backend: str) -> Tensor:
    return _wgrad(x_NI, dy_NO, offsets_E, backend)


gmm_op = torch.library.custom_op("moe::gmm", _gmm, mutates_args=())
gmm_wgrad_op = torch.library.custom_op("moe::gmm_wgrad", _gmm_wgrad, mutates_args=())


@gmm_op.register_fake
def _(x_NI: Tensor, w_EIO: Tensor, offsets_E: Tensor, backend: str, zero_tail: bool) -> Tensor:
    return x_NI.new_empty(x_NI.shape[0], w_EIO.shape[2])


@gmm_wgrad_op.register_fake
def _(x_NI: Tensor, dy_NO: Tensor, offsets_E: Tensor, backend: str) -> Tensor:
    return x_NI.new_empty(offsets_E.shape[0], x_NI.shape[1], dy_NO.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    x_NI, w_EIO, offsets_E, backend, zero_tail = inputs
    ctx.save_for_backward(x_NI, w_EIO, offsets_E)
    ctx.backend, ctx.zero_tail = backend, zero_tail


def _gradients(ctx, dy_NO: Tensor, gmm, gmm_wgrad):
    """dx and dw of ``gmm`` (the custom ops when compiled, the plain functions in eager)."""
    x_NI, w_EIO, offsets_E = ctx.saved_tensors
    dy_NO = dy_NO.contiguous()
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = gmm(dy_NO, w_EIO.transpose(1, 2), offsets_E, ctx.backend, ctx.zero_tail)
    if ctx.needs_input_grad[1]:
        mixed = {"out_dtype": w_EIO.dtype} if w_EIO.dtype != x_NI.dtype else {}
        if w_EIO.transpose(1, 2).is_contiguous() and not w_EIO.is_contiguous():
            dw = gmm_wgrad(dy_NO, x_NI, offsets_E, ctx.backend, **mixed).transpose(1, 2)
        else:
            dw = gmm_wgrad(x_NI, dy_NO, offsets_E, ctx.backend, **mixed)
    return dx, dw, None, None, None


gmm_op.register_autograd(
    lambda ctx, dy_NO: _gradients(ctx, dy_NO, gmm_op, gmm_wgrad_op), setup_context=_setup_context
)


class _EagerGroupedMM(torch.autograd.Function):
    """The same computation without the custom-op dispatcher, whose Python wrapping costs
    about 30 us a call forward and 60 us backward (a small layer's forward and backward on
    the CPU, 8 experts, top-1: 1.47 -> 1.27 ms of host time)."""

    @staticmethod
    def forward(ctx, x_NI, w_EIO, offsets_E, backend, zero_tail):
        _setup_context(ctx, (x_NI, w_EIO, offsets_E, backend, zero_tail), None)
        return _gmm(x_NI, w_EIO, offsets_E, backend, zero_tail)

    @staticmethod
    def backward(ctx, dy_NO):
        return _gradients(ctx, dy_NO, _gmm, _wgrad)


def grouped_mm(
    x_NI: Tensor, w_EIO: Tensor, offsets_E: Tensor, backend: str = "auto", zero_tail: bool = True
) -> Tensor:
    """``y[g] = x[g] @ w[e]`` for each expert e's rows ``offsets[e-1]:offsets[e]``.

    x_NI: [N, I]; w_EIO: [E, I, O] (a transposed view is fine); offsets_E: [E] int32
    cumulative group ends, ``offsets[-1] <= N``. Returns [N, O]; rows past ``offsets[-1]``
    (copies dropped by capacity) come out zero, here and in the input gradient.
    ``zero_tail=False`` promises ``offsets[-1] == N`` (a dropless layer) and skips zeroing
    them: on a GPU a read and a write of the output per GEMM. Under autocast the operands
    are cast to the autocast dtype, as ``torch.mm`` would be (our CPU kernels, ``avx512``
    and ``avx2``, round a float32 weight inside instead, to the same values, and return its
    gradient in float32 without a bfloat16 round trip).
    """
    if x_NI.dim() != 2 or w_EIO.dim() != 3 or x_NI.shape[1] != w_EIO.shape[1]:
        raise ValueError(
            f"grouped_mm needs x [N, I] and w [E, I, O]; got {tuple(x_NI.shape)} "
            f"and {tuple(w_EIO.shape)}"
        )
    if offsets_E.shape != (w_EIO.shape[0],):
        raise ValueError(f"offsets must have one entry per expert ({w_EIO.shape[0]})")
    device_type = x_NI.device.type
    float32_weight = False
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x_NI = x_NI.to(dtype)
        # Our CPU kernels round a float32 weight block by block (cpu_gemm.cpp); everything
        # else gets the cast copy. Eager only: the custom ops' shapes assume one dtype.
        float32_weight = (
            not torch.compiler.is_compiling()
            and x_NI.dtype == torch.bfloat16
            and w_EIO.dtype == torch.float32
            and resolve_backend(backend, x_NI, w_EIO) in (AVX512, AVX2)
        )
        if not float32_weight:
            w_EIO = w_EIO.to(dtype)
    if x_NI.dtype != w_EIO.dtype and not float32_weight:
        raise ValueError(f"grouped_mm operands differ in dtype: {x_NI.dtype} vs {w_EIO.dtype}")
    resolved = resolve_backend(backend, x_NI, w_EIO)  # an unknown name fails here
    offsets_E = offsets_E.to(torch.int32)
    if torch.compiler.is_compiling():
        # PyTorch's own op, whose backward the compiler knows: no Python in the compiled step
        # (a custom op runs its Python body on every call, ~50 us on a GPU's host). bfloat16
        # only: the op's shape function rejects float32 (torch 2.13).
        bf16 = x_NI.dtype == torch.bfloat16
        if not zero_tail and resolved is TORCH and bf16 and torch_gmm_supports(x_NI, w_EIO):
            return F.grouped_mm(x_NI, w_EIO, offs=offsets_E)
        return gmm_op(x_NI, w_EIO, offsets_E, backend, zero_tail)  # one opaque node
    return _EagerGroupedMM.apply(x_NI, w_EIO, offsets_E, backend, zero_tail)
