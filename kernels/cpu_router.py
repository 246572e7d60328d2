"""The router on CPUs where our kernels build (``cpu_router.cpp``): its logits, scores,
top-k selection, gates and the sums behind the balancing loss, the z-loss and the entropy, in
one pass forward and one backward.

Shape legend: T tokens, E experts, K chosen per token.

Eager, bfloat16 or float32 rows (the logits and everything after them in float32, as the
PyTorch path computes them); ``moe.layers.router`` keeps that path for everything else
(float64, compiled traces, group-limited choice, per-sequence balancing).

The logits: with bfloat16 rows and a bfloat16 weight, our bfloat16 GEMM (``cpu_gemm.cpp``)
with float32 sums and a float32 output (bfloat16 products are exact in float32, so only the
order of the sums differs from the float32 path); backward, the logits' gradient goes in as
two bfloat16 parts (see ``_bf16_linear_backward``). A float32 weight (autocast's master copy,
or float32 rows): our float32 kernel up to 32 experts, our float32 GEMMs on the rows in float32
above (the library's took 1.10-1.26x the time of the router's three products at 64 and 128
experts; the float32 layer at 64 and 128 experts level within the noise). The whole
router, forward and backward, T=4096, d=512, bfloat16 (2-core EPYC): 3.1 -> 1.6 ms at 32
experts, 9.4 -> 4.3 ms at 128 (the library's float32 GEMMs were 7.8 ms of it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import cpu_gemm


def usable(x_TD: Tensor) -> bool:
    """Whether these router inputs (bfloat16 or float32 CPU rows) can take our kernel."""
    if torch.compiler.is_compiling() or x_TD.device.type != "cpu":
        return False
    return x_TD.dtype in (torch.bfloat16, torch.float32) and cpu_gemm.avx512_available()


@dataclass
class Routed:
    """ids_TK, gates_TK: the choices and their combine weights. probs_sum_E: the routing
    probabilities summed over tokens. lse_sq_sum: ``sum_t logsumexp(l_t)^2``. entropy_sum:
    summed over tokens (nats; no gradient). routed_E: copies per expert (int64)."""

    ids_TK: Tensor
    gates_TK: Tensor
    probs_sum_E: Tensor
    lse_sq_sum: Tensor
    entropy_sum: Tensor
    routed_E: Tensor


def route(
    x_TD: Tensor,
    weight_ED: Tensor,
    bias_E: Tensor | None,
    top_k: int,
    sigmoid: bool,
    renormalize: bool,
    scale: float,
) -> Routed:
    """Logits ``x @ weight^T`` in float32; scores ``softmax(l)`` or ``sigmoid(l)``; the
    probabilities are the scores normalised to sum 1; the top ``top_k`` of score + bias are
    chosen; gates are their scores (renormalised to sum 1 if asked) times ``scale``."""
    bias = None if bias_E is None else bias_E.float().contiguous()
    args = (top_k, sigmoid, renormalize, float(scale))
    return Routed(*_Route.apply(x_TD.contiguous(), weight_ED.contiguous(), bias, *args))


def _bf16_operands(x_TD: Tensor, weight_ED: Tensor) -> bool:
    return x_TD.dtype == weight_ED.dtype == torch.bfloat16


def _one_group(x_TD: Tensor) -> Tensor:
    """The offsets of the grouped GEMMs for all rows in one group."""
    return torch.tensor([x_TD.shape[0]])


def _logits(x_TD: Tensor, weight_ED: Tensor) -> Tensor:
    kernels = cpu_gemm.module()
    if _bf16_operands(x_TD, weight_ED):
        return kernels.gmm_x_wt(x_TD, weight_ED[None], _one_group(x_TD), True)
    weight_ED = weight_ED.float()
    if weight_ED.shape[0] <= kernels.router_linear_experts:  # our float32 kernel
        return kernels.router_logits(x_TD, weight_ED)
    return kernels.gmm_x_wt(x_TD.float(), weight_ED[None], _one_group(x_TD), True)


def _logits_backward(x_TD: Tensor, weight_ED: Tensor, dlogits_TE: Tensor) -> tuple[Tensor, Tensor]:
    kernels = cpu_gemm.module()
    if _bf16_operands(x_TD, weight_ED):
        return _bf16_linear_backward(x_TD, weight_ED, dlogits_TE)
    weight32_ED = weight_ED.float()
    if weight_ED.shape[0] <= kernels.router_linear_experts:
        dx_TD, dweight_ED = kernels.router_linear_backward(x_TD, weight32_ED, dlogits_TE)
    else:
        group = _one_group(x_TD)
        dx_TD = kernels.gmm_x_w(dlogits_TE, weight32_ED[None], group).to(x_TD.dtype)
        dweight_ED = kernels.gmm_at_b(dlogits_TE, x_TD.float(), group, True)[0]
    return dx_TD, dweight_ED.to(weight_ED.dtype)


def _bf16_linear_backward(
    x_TD: Tensor, weight_ED: Tensor, dlogits_TE: Tensor
) -> tuple[Tensor, Tensor]:
    """dx = dlogits @ w and dw = dlogits^T @ x on bfloat16 GEMMs with float32 sums. The float32
    dlogits go in as hi + lo, two bfloat16 parts side by side along the reduction (each value
    kept to about 2^-16 of itself): rounding them to one bfloat16 instead made dw 600x less
    accurate (2.6e-6 -> 1.6e-3 of its largest value at 128 experts), as the sum over tokens
    cancels."""
    kernels = cpu_gemm.module()
    E = weight_ED.shape[0]
    hi_TE = dlogits_TE.to(torch.bfloat16)
    lo_TE = (dlogits_TE - hi_TE.float()).to(torch.bfloat16)
    parts_TE2 = torch.cat([hi_TE, lo_TE], dim=1)
    group = _one_group(x_TD)
    dx_TD = kernels.gmm_x_w(parts_TE2, torch.cat([weight_ED, weight_ED])[None], group)
    dweight_DE2 = kernels.gmm_at_b(x_TD, parts_TE2, group, True)[0]
    dweight_ED = (dweight_DE2[:, :E] + dweight_DE2[:, E:]).t().to(weight_ED.dtype)
    return dx_TD, dweight_ED


class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weight_ED, bias_E, top_k, sigmoid, renormalize, scale):
        kernels = cpu_gemm.module()
        logits_TE = _logits(x_TD, weight_ED)
        outputs = kernels.route_forward(logits_TE, bias_E, top_k, sigmoid, renormalize, scale)
        ids_TK, _, _, _, entropy_sum, routed_E = outputs
        ctx.save_for_backward(x_TD, weight_ED, logits_TE, ids_TK)
        ctx.args = (sigmoid, renormalize, scale)
        ctx.mark_non_differentiable(ids_TK, entropy_sum, routed_E)
        ctx.set_materialize_grads(False)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, _ids, dgates_TK, dprobs_sum_E, dlse_sq_sum, _entropy, _routed):
        x_TD, weight_ED, logits_TE, ids_TK = ctx.saved_tensors
        kernels = cpu_gemm.module()
        dlogits_TE = kernels.route_backward(
            logits_TE,
            ids_TK,
            None if dgates_TK is None else dgates_TK.float().contiguous(),
            None if dprobs_sum_E is None else dprobs_sum_E.float().contiguous(),
            0.0 if dlse_sq_sum is None else float(dlse_sq_sum),
            *ctx.args,
        )
        dx_TD, dweight_ED = _logits_backward(x_TD, weight_ED, dlogits_TE)
        return dx_TD, dweight_ED, None, None, None, None, None
