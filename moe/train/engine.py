"""What turns gradients into updates: ``parallel.engine=native`` (here) or ``deepspeed``
(``deepspeed_engine.py``). The trainer sees one interface:

- ``forward_model``: the module to call for training forwards;
- ``backward(loss)`` once per micro-batch (the engine divides by the accumulation);
- ``step(guard, loss, step) -> (grad_norm, updated)`` once per optimizer step;
- ``state_dicts()`` / ``load_state_dicts()``: model and optimizer state keyed by parameter
  name (``{"state": {name: {"step", "exp_avg", "exp_avg_sq"}}}``), the same for both
  engines, so a checkpoint of one resumes under the other.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from moe.parallel import clip_grad_norm_, sync_gradients
from moe.parallel.world import World

from .compile import compile_blocks
from .config import RunConfig
from .faults import NonFiniteGuard
from .optim import build_optimizer


class NativeEngine:
    """torch AdamW; gradients synced by ``moe.parallel`` over the layout's groups (dense over
    the world, experts over the ranks holding the same experts), then clipped globally."""

    def __init__(self, model: nn.Module, cfg: RunConfig, world: World, accumulation: int):
        self.model, self.world, self.accumulation = model, world, accumulation
        self.grad_clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        self.optimizer = build_optimizer(model, cfg.optim)
        layout = world.layout
        compile_blocks(model, cfg.train.compile, layout is not None and layout.ep > 1)
        self.forward_model = model

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self, guard: NonFiniteGuard, loss: float, step: int) -> tuple[float, bool]:
        layout = self.world.layout
        if layout is not None:
            sync_gradients(self.model, layout)
            grad_norm = clip_grad_norm_(self.model, layout, self.grad_clip)
        else:
            params = [p for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip).item()
        # A non-finite loss or gradient skips the update instead of poisoning the weights.
        updated = guard.ok(loss, grad_norm, step)
        if updated:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, updated

    def state_dicts(self) -> tuple[dict, dict]:
        return get_state_dict(self.model, self.optimizer)

    def load_state_dicts(self, model_sd: dict, optim_sd: dict) -> None:
        # Hyperparameters (lr scale, weight decay) come from this run's config.
        _, current = get_state_dict(self.model, self.optimizer)
        optim_sd = {"state": optim_sd["state"], "param_groups": current["param_groups"]}
        set_state_dict(
            self.model, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd
        )


def build_engine(model: nn.Module, cfg: RunConfig, world: World, accumulation: int):
    if cfg.parallel.engine == "native":
        return NativeEngine(model, cfg, world, accumulation)
    from .deepspeed_engine import DeepSpeedEngine  # imports DeepSpeed only when asked for

    return DeepSpeedEngine(model, cfg, world, accumulation)
