"""``all_to_all_single`` with variable splits and autograd: the backward pass sends the
gradients back along the same routes, with the splits swapped."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _exchange(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    """Rows ``in_splits[r]`` of ``x`` go to rank r; ``out_splits[r]`` rows come from rank r."""
    return AllToAll.apply(x, out_splits, in_splits, group)
