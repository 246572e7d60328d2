"""Dispatchers move token copies to their experts and the results back.

Shape legend: T tokens, K copies per token, N rows for the local experts, D model dim,
E_local experts held here.

The MoE layer talks to a dispatcher through two calls, so expert parallelism can swap in
an all-to-all dispatcher without the layer importing ``torch.distributed``:

- ``dispatch(x_TD, ids_TK, gates_TK) -> (x_ND, offsets_E, handle)``: rows grouped by local
  expert, with the group ends the grouped GEMM needs, and an opaque handle for combine.
- ``combine(y_ND, gates_TK, handle) -> y_TD``: expert outputs weighted by their gates and
  summed per token.
- ``routing_counts(handle) -> (kept_E, routed_E)``: token copies each of all E experts
  processed and was assigned before capacity, over every rank's tokens of this forward
  (the statistics of the layer, the same whatever the layout).
"""

from __future__ import annotations

from torch import Tensor

from moe.kernels import DispatchPlan, expert_capacity, permute, plan_dispatch, unpermute


class LocalDispatcher:
    """All experts live in this process: dispatch is a permutation of token copies."""

    def __init__(
        self,
        num_experts: int,
        capacity_factor: float = 0.0,
        priority: str = "sequence",
        backend: str = "auto",
    ):
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.priority = priority
        self.backend = backend

    def plan(self, ids_TK: Tensor, gates_TK: Tensor) -> DispatchPlan:
        T, K = ids_TK.shape
        capacity = None
        if self.capacity_factor > 0:
            capacity = expert_capacity(self.capacity_factor, T, K, self.num_experts)
        return plan_dispatch(ids_TK, self.num_experts, capacity, gates_TK, self.priority)

    def dispatch(
        self, x_TD: Tensor, ids_TK: Tensor, gates_TK: Tensor
    ) -> tuple[Tensor, Tensor, DispatchPlan]:
        plan = self.plan(ids_TK, gates_TK)
        return permute(x_TD, plan, self.backend), plan.offsets_E, plan

    def combine(self, y_ND: Tensor, gates_TK: Tensor, plan: DispatchPlan) -> Tensor:
        return unpermute(y_ND, gates_TK, plan, self.backend)

    def routing_counts(self, plan: DispatchPlan) -> tuple[Tensor, Tensor]:
        return plan.counts_E, plan.routed_E
