"""The expert-parallel dispatcher: same ``dispatch()`` / ``combine()`` contract as the
local one, with token copies travelling to the rank that holds their expert.

Shape legend: T local tokens, K top-k, E experts in all, L = E / ep experts on this rank,
D model dim, N rows received for the local experts.

dispatch: plan and permute locally over all E experts (rows grouped by expert, so by
destination rank), exchange the per-expert counts, send the rows with one variable-split
all-to-all, and regroup what arrived (ordered by source, then expert) by local expert.
combine runs the same steps backwards.

Capacity with "sequence" priority applies to the whole world's micro-batch, as in one
process: the ranks exchange their per-slot expert counts, and each keeps the copies whose
place among all ranks' copies of the expert, in (k, t) order with the ranks' tokens in rank
order, is within capacity. So dropping, like dropless routing, does not depend on the
layout. "gate" priority would need every rank's gates; it applies per rank (as in GShard).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moe.kernels import DispatchPlan, count_per_slot, permute, plan_dispatch, unpermute
from moe.layers import LocalDispatcher, MoEConfig

from .all_to_all import all_to_all
from .layout import ParallelLayout


@dataclass
class EPHandle:
    plan: DispatchPlan
    send_splits: list[int]  # rows sent to each rank of the EP group
    recv_splits: list[int]  # rows received from each rank
    regroup: Tensor  # received row order -> local-expert order
    restore: Tensor  # its inverse


class AllToAllDispatcher(LocalDispatcher):
    def __init__(self, config: MoEConfig, layout: ParallelLayout):
        super().__init__(config)
        self.layout = layout
        self.ep, self.ep_rank, self.group = layout.ep, layout.ep_rank, layout.ep_group
        self.local_experts = layout.local_experts(config.num_experts)

    def world_sum(self, counts: Tensor) -> Tensor:
        counts = counts.clone()
        dist.all_reduce(counts, group=self.layout.world_group)
        return counts

    def plan(self, ids_TK: Tensor, gates_TK: Tensor) -> DispatchPlan:
        if self.config.dropless or self.config.capacity_priority != "sequence":
            return super().plan(ids_TK, gates_TK)
        E = self.num_experts
        mine_KE = count_per_slot(ids_TK, E)
        every_WKE = [torch.empty_like(mine_KE) for _ in range(self.layout.world)]
        # The world's batch, not just the EP group's.
        dist.all_gather(every_WKE, mine_KE, group=self.layout.world_group)
        every_WKE = torch.stack(every_WKE)
        total_KE = every_WKE.sum(0)
        earlier_ranks_KE = every_WKE[: self.layout.rank].sum(0)
        earlier_slots_KE = torch.cumsum(total_KE, 0) - total_KE
        tokens = int(total_KE[0].sum())  # every token has one copy in slot 0
        ahead_KE = earlier_slots_KE + earlier_ranks_KE
        capacity = self.config.capacity(tokens)
        return plan_dispatch(ids_TK, E, capacity, gates_TK, "sequence", ahead_KE)

    def dispatch(self, x_TD: Tensor, ids_TK: Tensor, gates_TK: Tensor):
        plan = self.plan(ids_TK, gates_TK)
        x_ND = permute(x_TD, plan, self.backend)
        L = self.local_experts
        send_counts = plan.counts_E.view(self.ep, L)  # [destination rank, its local expert]
        recv_counts = torch.empty_like(send_counts)  # [source rank, my local expert]
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.group)
        send_splits = send_counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        kept_ND = x_ND[: sum(send_splits)]  # dropped copies sit behind the kept ones
        received = all_to_all(kept_ND, recv_splits, send_splits, self.group)
        # Arrived ordered by (source, expert); the grouped GEMM wants (expert, source):
        # a stable sort of each row's block by its expert-major position.
        blocks = torch.arange(self.ep * L, device=recv_counts.device)
        block_of_row = torch.repeat_interleave(blocks, recv_counts.reshape(-1))
        expert_major = (block_of_row % L) * self.ep + block_of_row // L
        regroup = torch.sort(expert_major, stable=True).indices.to(x_TD.device)
        restore = torch.argsort(regroup)
        offsets_L = torch.cumsum(recv_counts.sum(0), 0).to(torch.int32)
        handle = EPHandle(plan, send_splits, recv_splits, regroup, restore)
        return received.index_select(0, regroup), offsets_L, handle

    def routing_counts(self, handle: EPHandle) -> tuple[Tensor, Tensor]:
        """Kept and routed copies per expert of every rank's tokens (the world's
        micro-batch), not the rows this rank received for its own experts."""
        plan = handle.plan
        counts_2E = self.world_sum(torch.stack([plan.counts_E, plan.routed_E]))
        return counts_2E[0], counts_2E[1]

    def combine(self, y_ND: Tensor, gates_TK: Tensor, handle: EPHandle) -> Tensor:
        back = all_to_all(
            y_ND.index_select(0, handle.restore), handle.send_splits, handle.recv_splits, self.group
        )
        return unpermute(back, gates_TK, handle.plan, self.backend)
