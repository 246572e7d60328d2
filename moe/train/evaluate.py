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
    """Mean LM loss per trained target over the first ``eval.batches`` global micro-batches of
    the validation split (each rank evaluates its share; the same sequences whatever the
    layout)."""
    world = world or World()
    was_training = model.training
    model.eval()
    mb = cfg.train.micro_batch_size * world.size
    total, count = 0.0, 0
    for b in range(cfg.eval.batches):
        indices = world.my_rows(torch.arange(b * mb, (b + 1) * mb) % val.count)
        inputs, targets = val.batch(indices)
        ce, _ = lm_loss(model, inputs, targets, cfg, device)
        trained = int((targets != IGNORE).sum())
        total += ce.item() * trained
        count += trained
    model.train(was_training)
    total, count = world.sum([total, count])
    return total / max(count, 1)
