"""Dispatchers move token copies to their experts and the results back.

Shape legend: T tokens, K copies per token, N rows for the local experts, D model dim,
E_local experts held here.

The MoE layer talks to a dispatcher through two calls, so expert parallelism can swap in
an all-to-all dispatcher without the layer importing ``torch.distributed``:

- ``dispatch(x_TD, ids_TK, gates_TK) -> (x_ND, offsets_E, handle)``: rows grouped by local
  expert, with the group ends the grouped GEMM needs, and an opaque handle for combine.
- ``combine(y_ND, gates_TK, handle) -> y_TD``: expert outputs weighted by their gates and
  summed per token.
- ``world_sum(counts)``: counts summed over every process's tokens of this forward (the
  router's expert frequencies in micro-batch balancing);
- ``routing_counts(handle) -> (kept_E, routed_E)``: token copies each of all E experts
  processed and was assigned before capacity, over every rank's tokens of this forward
  (the statistics of the layer, the same whatever the layout).
"""

from __future__ import annotations

from torch import Tensor

from moe.kernels import DispatchPlan, permute, plan_dispatch, unpermute

from .config import MoEConfig


class LocalDispatcher:
    """All experts live in this process: dispatch is a permutation of token copies."""

    def __init__(self, config: MoEConfig):
        self.config = config
        self.num_experts = config.num_experts
        self.backend = config.backend

    def world_sum(self, counts: Tensor) -> Tensor:
        """Counts summed over every process's tokens: here, this process's own."""
        return counts

    def plan(self, ids_TK: Tensor, gates_TK: Tensor) -> DispatchPlan:
        capacity = self.config.capacity(ids_TK.shape[0])
        return plan_dispatch(
            ids_TK, self.num_experts, capacity, gates_TK, self.config.capacity_priority
        )

    def dispatch(
        self, x_TD: Tensor, ids_TK: Tensor, gates_TK: Tensor
    ) -> tuple[Tensor, Tensor, DispatchPlan]:
        plan = self.plan(ids_TK, gates_TK)
        return permute(x_TD, plan, self.backend), plan.offsets_E, plan

    def combine(self, y_ND: Tensor, gates_TK: Tensor, plan: DispatchPlan) -> Tensor:
        return unpermute(y_ND, gates_TK, plan, self.backend)

    def routing_counts(self, plan: DispatchPlan) -> tuple[Tensor, Tensor]:
        return plan.counts_E, plan.routed_E
