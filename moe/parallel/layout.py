"""World = data-parallel x expert-parallel.

Ranks ``g*ep .. g*ep + ep - 1`` form expert-parallel group g: together they hold every
expert once, rank ``g*ep + j`` holding experts ``j*E/ep .. (j+1)*E/ep - 1``. The ranks with
the same position j in every EP group hold the same experts: their expert gradients are
reduced together (the expert data-parallel group). Dense parameters are replicated on every
rank and reduced over the whole world.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass
class ParallelLayout:
    world: int
    rank: int
    ep: int
    ep_group: object  # ProcessGroup of this rank's EP group
    expert_dp_group: object  # ProcessGroup of the ranks holding the same experts
    world_group: object = None  # ProcessGroup of every rank of the layout (None: default)

    @staticmethod
    def check(world: int, ep: int, num_experts: int) -> None:
        """Which layouts exist: ``ep`` divides the world and every layer's experts."""
        if ep < 1 or world % ep:
            raise ValueError(f"parallel.ep={ep} must divide the number of processes ({world})")
        if num_experts % ep:
            raise ValueError(f"parallel.ep={ep} must divide model.moe.num_experts={num_experts}")

    def local_experts(self, num_experts: int) -> int:
        """Experts of a layer with ``num_experts`` that each rank holds."""
        self.check(self.world, self.ep, num_experts)
        return num_experts // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp(self) -> int:
        return self.world // self.ep

    @classmethod
    def create(cls, ep: int) -> ParallelLayout:
        """Build the groups (every rank must call this, in the same order)."""
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized; launch with torchrun")
        world, rank = dist.get_world_size(), dist.get_rank()
        if ep < 1 or world % ep:
            raise ValueError(f"parallel.ep={ep} must divide the number of processes ({world})")
        ep_group = expert_dp_group = None
        for g in range(world // ep):  # new_group is collective: every rank creates every group
            ranks = list(range(g * ep, (g + 1) * ep))
            group = dist.new_group(ranks)
            if rank in ranks:
                ep_group = group
        for j in range(ep):
            ranks = list(range(j, world, ep))
            group = dist.new_group(ranks)
            if rank in ranks:
                expert_dp_group = group
        return cls(world, rank, ep, ep_group, expert_dp_group)
