"""Expert pruning: keep a subset of experts in every MoE layer (router rows removed)."""

from __future__ import annotations

import dataclasses

import torch

from moe.layers import is_expert_param
from moe.model import MoETransformer

from .routing import LayerRouting


def most_used(stats: list[LayerRouting], keep: int) -> dict[int, list[int]]:
    """Per MoE block, the ``keep`` experts with the largest calibration load (in id order)."""
    chosen = {}
    for s in stats:
        order = sorted(range(len(s.load_fraction)), key=lambda e: (-s.load_fraction[e], e))
        chosen[s.block] = sorted(order[:keep])
    return chosen


@torch.no_grad()
def prune_experts(model: MoETransformer, keep: dict[int, list[int]]) -> MoETransformer:
    """A new model whose MoE block b has experts ``keep[b]`` (same count in every block);
    top_k is capped at the experts left."""
    counts = {len(v) for v in keep.values()}
    if len(counts) != 1:
        raise ValueError("keep the same number of experts in every MoE layer")
    n = counts.pop()
    cfg = model.config
    moe = dataclasses.replace(cfg.moe, num_experts=n, top_k=min(cfg.moe.top_k, n))
    pruned = MoETransformer(dataclasses.replace(cfg, moe=moe))
    source = model.state_dict()
    target = pruned.state_dict()
    for name, tensor in target.items():
        block = int(name.split(".")[1]) if name.startswith("blocks.") else None
        if block in keep and (
            is_expert_param(name) or "router.weight" in name or "expert_bias" in name
        ):
            tensor.copy_(source[name][keep[block]])
        else:
            tensor.copy_(source[name])
    return pruned.eval()
