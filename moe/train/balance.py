"""Balancing state the trainer keeps between optimizer steps.

Global load balancing (``model.moe.balance=global``): the token copies per expert of the
last optimizer step's global batch, every micro-batch and rank together.

They are known before any micro-batch of the next step runs, so the balancing loss of that
step, and its gradients, do not depend on how the batch is split over micro-batches and
ranks. The first step balances against uniform loads (the loss is then constant). The
loads travel with checkpoints, so a resumed run continues exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from moe.layers import MoELayer

FILE = "expert_loads.json"


class StepLoads:
    def __init__(self, moe_layers: int, num_experts: int):
        self.loads: list[Tensor] = [torch.ones(num_experts)] * moe_layers

    def on(self, device: torch.device) -> list[Tensor]:
        """Per MoE layer, what the model's forward takes as ``expert_loads``."""
        return [load.to(device) for load in self.loads]

    def update(self, loads: list[Tensor]) -> None:
        """This step's loads (summed over micro-batches and ranks) for the next step."""
        self.loads = loads

    def to_json(self) -> str:
        return json.dumps([load.tolist() for load in self.loads])

    def restore(self, checkpoint: Path) -> None:
        """Read a checkpoint's loads; checkpoints written before global balancing have none
        (the next step then balances against uniform loads)."""
        if (checkpoint / FILE).exists():
            self.loads = [
                torch.tensor(load) for load in json.loads((checkpoint / FILE).read_text())
            ]


def update_expert_biases(model: nn.Module, loads: list[Tensor], rate: float) -> None:
    """Aux-loss-free balancing (``model.moe.expert_bias``): nudge each router's bias by this
    step's expert loads (one per MoE layer, in order), after the optimizer step."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer, load in zip(layers, loads, strict=True):
        if layer.router.expert_bias_E is not None:
            layer.router.update_expert_bias(load.to(layer.router.expert_bias_E.device), rate)
