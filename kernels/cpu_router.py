"""The router on CPUs where our kernels build (``cpu_router.cpp``): its logits (up to 32
experts), scores, top-k selection, gates and the sums behind the balancing loss, the z-loss
and the entropy, in one pass forward and one backward.

Shape legend: T tokens, E experts, K chosen per token.

Eager, bfloat16 or float32 rows (the logits and everything after them in float32, as the
PyTorch path computes them); ``moe.layers.router`` keeps that path for everything else
(float64, compiled traces, group-limited choice, per-sequence balancing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
    return Routed(*_Route.apply(x_TD.contiguous(), weight_ED.float().contiguous(), bias, *args))


class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weight_ED, bias_E, top_k, sigmoid, renormalize, scale):
        kernels = cpu_gemm.module()
        if weight_ED.shape[0] <= kernels.router_linear_experts:  # our kernel computes them
            logits_TE = kernels.router_logits(x_TD, weight_ED)
        else:  # a library GEMM: many columns
            logits_TE = F.linear(x_TD.float(), weight_ED)
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
        if weight_ED.shape[0] <= kernels.router_linear_experts:
            dx_TD, dweight_ED = kernels.router_linear_backward(x_TD, weight_ED, dlogits_TE)
        else:
            dx_TD = (dlogits_TE @ weight_ED).to(x_TD.dtype)
            dweight_ED = dlogits_TE.t() @ x_TD.float()
        return dx_TD, dweight_ED, None, None, None, None, None
