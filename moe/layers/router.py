"""Top-k router: Switch's softmax scores, or DeepSeek-V3's sigmoid scores with a selection
bias and group-limited choice.

Shape legend: T tokens, D model dim, E experts, K chosen experts per token, G expert groups,
X experts per group.

Logits and scores are float32 whatever the autocast dtype: routing decisions and the
auxiliary losses are sensitive to rounding. The router returns plain tensors and owns no
communication; the expert frequencies of the load-balancing loss come from the tokens it
was given, or (``balance="global"``) from the global counts its caller passes in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.kernels import count_per_expert, cpu_router

from .config import MoEConfig


@dataclass
class RouterOutput:
    """What the router decided for T tokens.

    ids_TK: chosen experts, best first.
    gates_TK: float32 combine weights of those choices.
    (Selection uses the scores plus the expert bias, if any, within the best groups if
    group-limited; the gates are the unbiased scores: ``MoEConfig.score``/``gate_mode``.)
    aux_loss: load-balancing loss ``E * sum_i f_i * P_i``; f_i is the fraction of token
        copies assigned to expert i (before any capacity drop; over which tokens:
        ``MoEConfig.balance``), P_i the mean router probability of i. Equals 1 for
        perfectly uniform routing, whatever K.
    z_loss: ``mean_t logsumexp(logits_t)^2``, keeps logits small.
    routed_E: token copies assigned to each expert (int64, no gradient).
    entropy: mean entropy of the routing distribution, in nats (no gradient).
    """

    ids_TK: Tensor
    gates_TK: Tensor
    aux_loss: Tensor
    z_loss: Tensor
    routed_E: Tensor
    entropy: Tensor


class Router(nn.Module):
    def __init__(self, d_model: int, config: MoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.gate_mode = config.gate_mode
        self.score = config.score
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.gate_scale = config.gate_scale
        self.balance = config.balance
        self.jitter = config.jitter
        self.weight_ED = nn.Parameter(torch.empty(config.num_experts, d_model))
        nn.init.normal_(self.weight_ED, std=d_model**-0.5)
        # The bias steers selection only; gates still come from the unbiased probabilities.
        self.register_buffer(
            "expert_bias_E", torch.zeros(config.num_experts) if config.expert_bias else None
        )

    def forward(
        self,
        x_TD: Tensor,
        seq_len: int | None = None,
        load_E: Tensor | None = None,
        world_sum: Callable[[Tensor], Tensor] | None = None,
    ) -> RouterOutput:
        """``seq_len``: tokens per sequence (consecutive rows), for ``balance="sequence"``;
        ``load_E``: token copies per expert over the last optimizer step's global batch,
        for ``balance="global"``; ``world_sum``: sums counts over every process's tokens
        (the dispatcher's; the router itself never communicates)."""
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD * noise
        # float32 at least (float64 stays float64, for reference tests).
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(x_TD.device.type, enabled=False):
            if self._fused(x_TD):
                return self._route_fused(x_TD, load_E, world_sum)
            logits_TE = F.linear(x_TD.to(dtype), self.weight_ED.to(dtype))
            if self.score == "sigmoid":
                scores_TE = torch.sigmoid(logits_TE)
                # The balancing loss and the entropy want a distribution over experts.
                probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
            else:
                scores_TE = probs_TE = torch.softmax(logits_TE, dim=-1)
            ids_TK = self._choose(scores_TE.detach())
            gates_TK = scores_TE.gather(1, ids_TK)
            if self.gate_mode == "renormalize":
                gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True)
            if self.gate_scale != 1.0:
                gates_TK = gates_TK * self.gate_scale

            T, E = probs_TE.shape
            routed_E = count_per_expert(ids_TK, E)
            if T == 0:
                zero = logits_TE.sum()  # keeps the graph connected to the router weight
                return RouterOutput(ids_TK, gates_TK, zero, zero, routed_E, zero.detach())
            aux_loss = self._balance_loss(probs_TE, ids_TK, routed_E, seq_len, load_E, world_sum)
            z_loss = torch.logsumexp(logits_TE, dim=-1).square().mean()
            entropy = -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(-1).mean()
        return RouterOutput(ids_TK, gates_TK, aux_loss, z_loss, routed_E, entropy.detach())

    def _fused(self, x_TD: Tensor) -> bool:
        """Whether our CPU kernel can route these rows (kernels/cpu_router.py): the same
        results in one pass, for every setting but group-limited choice and per-sequence
        balance."""
        plain = self.n_group == 1 and self.balance != "sequence" and x_TD.shape[0] > 0
        return plain and cpu_router.usable(x_TD)

    def _route_fused(
        self,
        x_TD: Tensor,
        load_E: Tensor | None,
        world_sum: Callable[[Tensor], Tensor] | None,
    ) -> RouterOutput:
        T, E = x_TD.shape[0], self.num_experts
        routed = cpu_router.route(
            x_TD,
            self.weight_ED,
            self.expert_bias_E,
            self.top_k,
            sigmoid=self.score == "sigmoid",
            renormalize=self.gate_mode == "renormalize",
            scale=self.gate_scale,
        )
        f_E = self._frequencies(routed.routed_E, load_E, world_sum, routed.probs_sum_E.dtype)
        return RouterOutput(
            ids_TK=routed.ids_TK,
            gates_TK=routed.gates_TK,
            aux_loss=E * torch.sum(f_E * routed.probs_sum_E) / T,
            z_loss=routed.lse_sq_sum / T,
            routed_E=routed.routed_E,
            entropy=routed.entropy_sum / T,
        )

    def _choose(self, scores_TE: Tensor) -> Tensor:
        """Top-k experts by score plus the selection bias, within each token's ``topk_group``
        best groups (a group ranks by the sum of its two best biased scores)."""
        if self.expert_bias_E is not None:
            scores_TE = scores_TE + self.expert_bias_E
        if self.n_group > 1:
            scores_TGX = scores_TE.unflatten(-1, (self.n_group, -1))
            best_in_group = min(2, scores_TGX.shape[-1])
            group_TG = scores_TGX.topk(best_in_group, dim=-1).values.sum(-1)
            chosen_TG = group_TG.topk(self.topk_group, dim=-1).indices
            keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter(1, chosen_TG, True)
            scores_TE = scores_TGX.masked_fill(~keep_TG[..., None], float("-inf")).flatten(1)
        return torch.topk(scores_TE, self.top_k, dim=-1).indices

    def _balance_loss(
        self,
        probs_TE: Tensor,
        ids_TK: Tensor,
        routed_E: Tensor,
        seq_len: int | None,
        load_E: Tensor | None,
        world_sum: Callable[[Tensor], Tensor] | None,
    ) -> Tensor:
        """``E * sum_i f_i * P_i``: f_i the share of token copies routed to expert i (no
        gradient), P_i the mean router probability of i over this forward's tokens."""
        T, E = probs_TE.shape
        if self.balance == "sequence":
            # Each sequence's own f and P (B sequences of S tokens), averaged over sequences.
            S = seq_len or T
            copies_BE = F.one_hot(ids_TK, E).sum(1).unflatten(0, (-1, S)).sum(1)
            f_BE = copies_BE.to(probs_TE.dtype) / (S * self.top_k)
            P_BE = probs_TE.unflatten(0, (-1, S)).mean(1)
            return E * (f_BE * P_BE).sum(-1).mean()
        f_E = self._frequencies(routed_E, load_E, world_sum, probs_TE.dtype)
        return E * torch.sum(f_E * probs_TE.mean(dim=0))

    def _frequencies(
        self,
        routed_E: Tensor,
        load_E: Tensor | None,
        world_sum: Callable[[Tensor], Tensor] | None,
        dtype: torch.dtype,
    ) -> Tensor:
        """f_i of the balancing loss (balance "global" or "micro"): each expert's share of
        the token copies."""
        if self.balance == "global" and load_E is not None:
            counts_E = load_E
        else:  # this forward's tokens, on every data-parallel rank when a reducer is set
            counts_E = routed_E if world_sum is None else world_sum(routed_E)
        return counts_E.to(dtype) / counts_E.sum().clamp_min(1)

    @torch.no_grad()
    def update_expert_bias(self, routed_E: Tensor, rate: float = 1e-3) -> None:
        """Aux-loss-free balancing step: raise the bias of under-loaded experts, lower the rest.

        Call after the optimizer step with the loads the last forward reported (summed over
        micro-batches and, in a distributed run, over ranks).
        """
        if self.expert_bias_E is None:
            raise RuntimeError("this router has no expert bias; build it with expert_bias=True")
        load_E = routed_E.float()
        self.expert_bias_E += rate * torch.sign(load_E.mean() - load_E)
