"""Turn a plain model into its expert-parallel, data-parallel shard, and keep gradients in
step: the torchtitan way, applied from outside, the model code unchanged.

Effective objective with W ranks: the mean over ranks of each rank's loss (each rank holds
an equal share of every global micro-batch). Dense gradients are averaged over the world.
An expert's gradient on its rank already sums what every rank of its EP group sent it, so
it is summed over the ranks holding the same experts and divided by W.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moe.layers import MoELayer, expert_parameters

from .dispatcher import AllToAllDispatcher
from .layout import ParallelLayout


@torch.no_grad()
def parallelize_experts(model: nn.Module, layout: ParallelLayout) -> nn.Module:
    """In place: keep this rank's slice of every MoE layer's experts and swap in the
    all-to-all dispatcher (which also sums the routers' expert counts over the world)."""
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        local = layout.local_experts(layer.config.num_experts)
        first = layout.ep_rank * local
        experts = layer.experts
        experts.w_in_EHD = nn.Parameter(experts.w_in_EHD[first : first + local].clone())
        experts.w_out_EDF = nn.Parameter(experts.w_out_EDF[first : first + local].clone())
        experts.first_expert = first
        layer.dispatcher = AllToAllDispatcher(layer.config, layout)
    return model


def _reduce(params: list[nn.Parameter], group, scale: float) -> None:
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)  # one collective per group, not one per tensor
    dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(synced)


def sync_gradients(model: nn.Module, layout: ParallelLayout) -> None:
    """After backward, before clipping and the optimizer step."""
    experts = expert_parameters(model)
    params = [p for p in model.parameters() if p.grad is not None]
    _reduce([p for p in params if id(p) not in experts], None, 1.0 / layout.world)
    _reduce([p for p in params if id(p) in experts], layout.expert_dp_group, 1.0 / layout.world)


def clip_grad_norm_(model: nn.Module, layout: ParallelLayout, max_norm: float) -> float:
    """Global gradient norm over every parameter of the whole model (experts of all EP
    ranks included), and clipping by it; call after ``sync_gradients``."""
    experts = expert_parameters(model)
    params = [p for p in model.parameters() if p.grad is not None]
    dense_sq = sum(
        (p.grad.float().square().sum() for p in params if id(p) not in experts), torch.zeros(())
    )
    expert_sq = sum(
        (p.grad.float().square().sum() for p in params if id(p) in experts), torch.zeros(())
    )
    dist.all_reduce(expert_sq, group=layout.ep_group)  # each EP rank holds different experts
    norm = (dense_sq + expert_sq).sqrt().item()
    if norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            p.grad.mul_(scale)
    return norm
