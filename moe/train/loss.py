"""The training objective's language-model part: next-token cross-entropy under the
run's autocast (the MoE losses come with the model output)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from moe.data.batches import IGNORE
from moe.model import MoETransformer

from .config import RunConfig


def autocast(cfg: RunConfig, device: torch.device):
    if cfg.train.dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def lm_loss(
    model: MoETransformer,
    inputs,
    targets,
    cfg: RunConfig,
    device,
    expert_loads=None,
    trained_per_micro_batch: float | None = None,
):
    """Cross-entropy over the trained targets (those not ``IGNORE``): their mean, or, given
    ``trained_per_micro_batch`` (the global batch's trained targets over its micro-batches
    on all ranks), their sum divided by it, so that accumulating micro-batches gives the mean
    over the global batch however the trained tokens fall (chat data)."""
    with autocast(cfg, device):
        out = model(inputs.to(device), expert_loads)
    flat = targets.to(device).flatten()
    ce = F.cross_entropy(
        out.logits.float().flatten(0, 1), flat, ignore_index=IGNORE, reduction="sum"
    )
    if trained_per_micro_batch is None:
        return ce / (flat != IGNORE).sum().clamp_min(1), out
    return ce / max(trained_per_micro_batch, 1e-9), out
