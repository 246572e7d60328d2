"""The training objective's language-model part: next-token cross-entropy under the
run's autocast (the MoE losses come with the model output)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from moe.model import MoETransformer

from .config import RunConfig


def autocast(cfg: RunConfig, device: torch.device):
    if cfg.train.dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def lm_loss(model: MoETransformer, inputs, targets, cfg: RunConfig, device, expert_loads=None):
    with autocast(cfg, device):
        out = model(inputs.to(device), expert_loads)
    ce = F.cross_entropy(out.logits.float().flatten(0, 1), targets.to(device).flatten())
    return ce, out
