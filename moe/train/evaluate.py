"""Validation loss, computed the same way in training, ``moe-eval`` and exports."""

from __future__ import annotations

import torch

from moe.data import PackedSequences
from moe.data.batches import IGNORE
from moe.model import MoETransformer
from moe.parallel.world import World

from .config import RunConfig
from .loss import lm_loss


@torch.no_grad()
def evaluate(
    model: MoETransformer, val: PackedSequences, cfg: RunConfig, device, world: World | None = None
) -> float:
    """Mean LM loss per trained target over ``eval.batches`` global micro-batches of
    validation sequences spread evenly over the split (each rank evaluates its share; the
    same sequences whatever the layout)."""
    world = world or World()
    was_training = model.training
    model.eval()
    mb = cfg.train.micro_batch_size * world.size
    chosen = spread_evenly(cfg.eval.batches * mb, val.count)
    total, count = 0.0, 0
    for b in range(cfg.eval.batches):
        indices = world.my_rows(chosen[b * mb : (b + 1) * mb])
        inputs, targets = val.batch(indices)
        ce, _ = lm_loss(model, inputs, targets, cfg, device)
        trained = int((targets != IGNORE).sum())
        total += ce.item() * trained
        count += trained
    model.train(was_training)
    total, count = world.sum([total, count])
    return total / max(count, 1)


def spread_evenly(n: int, count: int) -> torch.Tensor:
    """``n`` sequence indices spread evenly over ``count`` sequences (each one at most once
    while ``n <= count``). The split's first sequences come from one or two files: their loss
    said little about the whole split (0.22 nats below it in the 800-step runs of
    benchmarks/results/2026-11-26-warmup)."""
    if n >= count:
        return torch.arange(n) % count
    return torch.arange(n) * count // n
