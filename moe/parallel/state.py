"""Checkpoint state across layouts: in the state dicts handed to
``torch.distributed.checkpoint``, every expert tensor (weights and AdamW moments) is a
DTensor over a (data-parallel, expert-parallel) device mesh: sharded along the expert
dimension over EP, replicated over DP.

Saving, each EP rank writes its own rows (no gather, no full copy on any rank). Loading,
DCP reads into each rank exactly the rows its slice covers, whatever layout wrote them; a
single process loads the same files into full tensors.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from moe.layers import is_expert_param

from .layout import ParallelLayout


class ExpertShards:
    def __init__(self, layout: ParallelLayout):
        self.layout = layout
        self._mesh: DeviceMesh | None = None

    def _mesh_for(self, t: torch.Tensor) -> DeviceMesh:
        """Rank = dp_index * ep + ep_index, as in ``ParallelLayout``; built on first use
        (collective: every rank saves and loads together)."""
        if self._mesh is None:
            self._mesh = init_device_mesh(
                t.device.type, (self.layout.dp, self.layout.ep), mesh_dim_names=("dp", "ep")
            )
        return self._mesh

    def _distribute(self, t: torch.Tensor) -> DTensor:
        return DTensor.from_local(t, self._mesh_for(t), [Replicate(), Shard(0)], run_check=False)

    def distribute(self, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]:
        """This rank's expert slices -> DTensors of the full stacks (no communication)."""
        return _map_experts(model_sd, optim_sd, self._distribute)

    def localize(self, model_sd: dict, optim_sd: dict) -> tuple[dict, dict]:
        """DTensors -> this rank's slices."""
        return _map_experts(model_sd, optim_sd, lambda t: t.to_local())


def _map_experts(model_sd: dict, optim_sd: dict, fn) -> tuple[dict, dict]:
    model_out = {k: fn(v) if is_expert_param(k) else v for k, v in model_sd.items()}
    state = {}
    for fqn, moments in optim_sd["state"].items():
        state[fqn] = {
            k: fn(v) if is_expert_param(fqn) and torch.is_tensor(v) and v.dim() > 0 else v
            for k, v in moments.items()
        }
    return model_out, {**optim_sd, "state": state}
