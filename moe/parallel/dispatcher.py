"""The expert-parallel dispatcher: same ``dispatch()`` / ``combine()`` contract as the
local one, with token copies travelling to the rank that holds their expert.

Shape legend: T local tokens, K top-k, E experts in all, L = E / ep experts on this rank,
D model dim, N rows received for the local experts.

dispatch: plan and permute locally over all E experts (rows grouped by expert, so by
destination rank), exchange the per-expert counts, send the rows with one variable-split
all-to-all, and regroup what arrived (ordered by source, then expert) by local expert.
combine runs the same steps backwards. Capacity, when set, applies per rank to the tokens
of that rank (as in GShard); dropless routing is independent of the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moe.kernels import DispatchPlan, permute, unpermute
from moe.layers import LocalDispatcher

from .all_to_all import all_to_all


@dataclass
class EPHandle:
    plan: DispatchPlan
    send_splits: list[int]  # rows sent to each rank of the EP group
    recv_splits: list[int]  # rows received from each rank
    regroup: Tensor  # received row order -> local-expert order
    restore: Tensor  # its inverse


class AllToAllDispatcher(LocalDispatcher):
    def __init__(
        self,
        num_experts: int,
        ep: int,
        ep_rank: int,
        group,
        capacity_factor: float = 0.0,
        priority: str = "sequence",
        backend: str = "auto",
    ):
        super().__init__(num_experts, capacity_factor, priority, backend)
        if num_experts % ep:
            raise ValueError(f"parallel.ep={ep} must divide model.moe.num_experts={num_experts}")
        self.ep, self.ep_rank, self.group = ep, ep_rank, group
        self.local_experts = num_experts // ep

    def dispatch(self, x_TD: Tensor, ids_TK: Tensor, gates_TK: Tensor):
        plan = self.plan(ids_TK, gates_TK)
        x_ND = permute(x_TD, plan, self.backend)
        L = self.local_experts
        send_counts = plan.counts_E.view(self.ep, L)  # [destination rank, its local expert]
        recv_counts = torch.empty_like(send_counts)  # [source rank, my local expert]
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.group)
        send_splits = send_counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        received = all_to_all(x_ND, recv_splits, send_splits, self.group)
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

    def combine(self, y_ND: Tensor, gates_TK: Tensor, handle: EPHandle) -> Tensor:
        back = all_to_all(
            y_ND.index_select(0, handle.restore), handle.send_splits, handle.recv_splits, self.group
        )
        return unpermute(back, gates_TK, handle.plan, self.backend)
