"""Routing plan: which row of the expert-ordered buffer holds which token copy.

Shape legend: T tokens, K copies per token (top-k), E experts, N kept rows (N <= T*K).

A token copy is the pair (t, k): token t sent to its k-th choice ``ids_TK[t, k]``.
Copies are grouped by expert with a stable sort, so the expert-ordered buffer is a
concatenation of E groups whose sizes are ``counts_E`` and whose end offsets are
``offsets_E`` (the layout the grouped GEMM consumes).

Capacity is a mask on that sorted order, not a padded tensor: within each expert the
copies are ranked by priority and those ranked at or beyond ``capacity`` are dropped
(their contribution is zero; the residual connection carries the token). Dropped copies
move behind the kept ones, past ``offsets_E[-1]``, so the buffer always has T*K rows: no
size that depends on the routing, no host synchronisation, a static shape for
``torch.compile``. The grouped GEMM computes no row past ``offsets_E[-1]``.

Priority orders, documented because they decide *which* copies survive:
- ``"sequence"`` (Switch / GShard): all first choices before all second choices, and
  within one choice level, earlier tokens first: the order (k, t).
- ``"gate"`` (batch-prioritized routing): higher gate value first; ties keep the
  (k, t) order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import cpu_rows

PRIORITIES = ("sequence", "gate")


@dataclass(frozen=True)
class DispatchPlan:
    """Index maps between token copies and the expert-ordered row buffer.

    row_token_N: token index of each row: kept rows in expert order, then dropped ones.
    row_copy_N:  flat copy index ``t * K + k`` held by each row.
    pos_TK:      row index of each copy, -1 where the copy was dropped.
    counts_E:    kept rows per expert (int64).
    offsets_E:   cumulative end offset of each expert's group (int32, grouped-GEMM layout).
    routed_E:    copies assigned to each expert before capacity (int64).
    """

    row_token_N: Tensor
    row_copy_N: Tensor
    pos_TK: Tensor
    counts_E: Tensor
    offsets_E: Tensor
    routed_E: Tensor

    @property
    def num_rows(self) -> int:
        """Rows of the expert-ordered buffer (T*K); the kept ones end at ``offsets_E[-1]``."""
        return self.row_token_N.shape[0]

    @property
    def num_copies(self) -> int:
        return self.pos_TK.numel()


def count_per_expert(ids: Tensor, num_experts: int) -> Tensor:
    """How many entries of ``ids`` name each expert (int64 [E]).

    A scatter-add rather than ``torch.bincount``, which waits for the GPU to learn its
    output size.
    """
    flat = ids.reshape(-1).long()
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=ids.device)
    return counts_E.scatter_add_(0, flat, torch.ones_like(flat))


def count_per_slot(ids_TK: Tensor, num_experts: int) -> Tensor:
    """``[K, E]``: copies of top-k slot k routed to expert e."""
    K = ids_TK.shape[1]
    slots = torch.arange(K, device=ids_TK.device) * num_experts
    flat = (ids_TK.long() + slots).reshape(-1)
    return torch.bincount(flat, minlength=K * num_experts).view(K, num_experts)


def narrow_keys(keys: Tensor, bound: int) -> Tensor:
    """``keys`` (all below ``bound``) in the narrowest signed integer type that holds them:
    a GPU radix sort makes one pass per byte of its key type (a sort of 16k expert ids with
    int16 keys instead of int64: 2 passes instead of 8)."""
    for dtype in (torch.int16, torch.int32):
        if bound <= torch.iinfo(dtype).max:
            return keys.to(dtype)
    return keys


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Rows each expert may take: ``ceil(capacity_factor * T * K / E)``.

    A factor <= 0 means dropless, returned as ``T * K`` (no expert can receive more).
    """
    if capacity_factor <= 0:
        return num_tokens * top_k
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def plan_dispatch(
    ids_TK: Tensor,
    num_experts: int,
    capacity: int | None = None,
    gates_TK: Tensor | None = None,
    priority: str = "sequence",
    ahead_KE: Tensor | None = None,
) -> DispatchPlan:
    """Group token copies by expert, keeping at most ``capacity`` per expert.

    ``capacity=None`` is dropless. ``gates_TK`` is needed for ``priority="gate"``.
    ``ahead_KE`` (sequence priority): when these tokens are one part of a larger batch, the
    copies of the other parts that come before this part's copies of slot k to expert e in
    the (k, t) order; capacity then applies to the whole batch.
    The plan is pure index arithmetic and carries no gradient.
    """
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
    if priority == "gate" and gates_TK is None:
        raise ValueError("priority='gate' needs gates_TK")
    T, K = ids_TK.shape
    device = ids_TK.device
    ids_TK = ids_TK.long()
    dropless = capacity is None or (capacity >= T * K and ahead_KE is None)
    if dropless and priority == "sequence" and cpu_rows.usable(ids_TK):
        row_token_N, row_copy_N, pos_TK, counts_E, offsets_E = cpu_rows.plan_dropless(
            ids_TK, num_experts
        )
        return DispatchPlan(row_token_N, row_copy_N, pos_TK, counts_E, offsets_E, counts_E)

    # Candidate order before grouping: copies listed k-major, i.e. (k, t).
    copies = torch.arange(T * K, device=device).view(T, K).t().reshape(-1)
    experts = ids_TK.t().reshape(-1)
    if priority == "gate":
        by_gate = torch.sort(gates_TK.t().reshape(-1), descending=True, stable=True).indices
        copies, experts = copies[by_gate], experts[by_gate]
    by_expert = torch.sort(narrow_keys(experts, num_experts), stable=True).indices
    sorted_copies = copies[by_expert]
    sorted_experts = experts[by_expert]

    routed_E = count_per_expert(ids_TK, num_experts)
    if ahead_KE is not None and priority != "sequence":
        raise ValueError("ahead_KE needs priority='sequence'")
    if capacity is not None and (capacity < T * K or ahead_KE is not None):
        starts_E = torch.cumsum(routed_E, 0) - routed_E
        rank = torch.arange(T * K, device=device) - starts_E[sorted_experts]
        if ahead_KE is not None:  # rank among all the batch's copies of the expert
            slot = sorted_copies % K
            mine_KE = count_per_slot(ids_TK, num_experts)
            earlier_slots_KE = torch.cumsum(mine_KE, 0) - mine_KE
            rank = rank - earlier_slots_KE[slot, sorted_experts] + ahead_KE[slot, sorted_experts]
        keep = rank < capacity
        counts_E = torch.zeros_like(routed_E).scatter_add_(0, sorted_experts, keep.long())
        kept_first = torch.sort((~keep).to(torch.uint8), stable=True).indices
        sorted_copies = sorted_copies[kept_first]
        dropping = True
    else:
        counts_E, dropping = routed_E, False

    # Each copy's row is the inverse permutation (an argsort rather than a scatter, which
    # inductor's CPU code generator miscompiles when fused with the index arithmetic).
    pos_TK = torch.argsort(narrow_keys(sorted_copies, T * K))
    if dropping:
        pos_TK = torch.where(pos_TK < counts_E.sum(), pos_TK, -1)
    return DispatchPlan(
        row_token_N=torch.div(sorted_copies, K, rounding_mode="floor"),
        row_copy_N=sorted_copies,
        pos_TK=pos_TK.view(T, K),
        counts_E=counts_E,
        offsets_E=torch.cumsum(counts_E, 0).to(torch.int32),
        routed_E=routed_E,
    )
