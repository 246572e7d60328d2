"""Checkpoint state across layouts: every checkpoint holds the full expert stacks, so it
can be resumed at any world size and expert-parallel degree.

Saving gathers each rank's expert slice (and its AdamW moments) over the EP group; loading
reads the full stacks and keeps this rank's slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .layout import ParallelLayout


def is_expert_key(fqn: str) -> bool:
    return ".experts.w_" in fqn


class ExpertShards:
    def __init__(self, layout: ParallelLayout):
        self.layout = layout

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.layout.ep)]
        dist.all_gather(parts, t.contiguous(), group=self.layout.ep_group)
        return torch.cat(parts)

    def _slice(self, t: torch.Tensor) -> torch.Tensor:
        rows = t.shape[0] // self.layout.ep
        return t[self.layout.ep_rank * rows : (self.layout.ep_rank + 1) * rows].clone()

    def _map(self, model_sd: dict, optim_sd: dict, fn) -> tuple[dict, dict]:
        model_out = {k: fn(v) if is_expert_key(k) else v for k, v in model_sd.items()}
        state = {}
        for fqn, moments in optim_sd["state"].items():
            state[fqn] = {
                k: fn(v) if is_expert_key(fqn) and torch.is_tensor(v) and v.dim() > 0 else v
                for k, v in moments.items()
            }
        return model_out, {**optim_sd, "state": state}

    def gather(self, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]:
        """This rank's slices -> full stacks (collective over the EP group)."""
        return self._map(model_sd, optim_sd, self._gather)

    def skeleton(self, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]:
        """Full-shaped empty tensors to load a checkpoint into (no communication)."""

        def grow(t):
            return t.new_empty(t.shape[0] * self.layout.ep, *t.shape[1:])

        return self._map(model_sd, optim_sd, grow)

    def slice(self, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]:
        """Full stacks -> this rank's slices."""
        return self._map(model_sd, optim_sd, self._slice)
