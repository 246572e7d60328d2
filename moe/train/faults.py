"""What the trainer does when the world misbehaves: preemption signals, non-finite
numbers, router collapse."""

from __future__ import annotations

import math
import signal

import torch

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; a requeue script resubmits with resume=auto
EXIT_NUMERICAL = 3


class Preempted(Exception):
    """A preemption signal arrived; a checkpoint was written after the current step."""

    def __init__(self, signum: int, step: int, checkpoint):
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received: stopped after step {step}, checkpoint {checkpoint}; "
            "rerun with resume=auto to continue"
        )


class NumericalFault(Exception):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class PreemptionFlag:
    """SIGTERM and SIGUSR1 (what Slurm sends before a kill) only set a flag: the loop finishes
    its step, writes a checkpoint and stops cleanly."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signum = signum


class NonFiniteGuard:
    """Counts skipped updates; raises after ``max_in_row`` consecutive ones."""

    def __init__(self, max_in_row: int):
        self.max_in_row = max_in_row
        self.in_row = 0
        self.skipped = 0

    def ok(self, loss: float, grad_norm: float, step: int) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_row = 0
            return True
        self.in_row += 1
        self.skipped += 1
        if self.in_row >= self.max_in_row:
            raise NumericalFault(
                f"{self.in_row} steps in a row with a non-finite loss or gradient norm "
                f"(last at step {step}); updates were skipped, so the weights and the last "
                "checkpoint are intact; lower optim.lr or check the data, then resume=auto"
            )
        return False


class CollapseDetector:
    """Warns once per layer when one expert takes more than ``threshold`` of the token
    copies (tokens x top-k) for ``patience`` consecutive steps."""

    def __init__(self, threshold: float, patience: int):
        self.threshold, self.patience = threshold, patience
        self.streaks: dict[int, int] = {}
        self.warned: set[int] = set()

    def update(self, loads: list[torch.Tensor], copies: int, step: int) -> list[str]:
        messages = []
        for layer, load in enumerate(loads):
            if len(load) < 2:  # a single expert takes every token by design
                continue
            share = load.max().item() / max(copies, 1)
            self.streaks[layer] = self.streaks.get(layer, 0) + 1 if share > self.threshold else 0
            if self.streaks[layer] >= self.patience and layer not in self.warned:
                self.warned.add(layer)
                expert = int(load.argmax())
                messages.append(
                    f"router collapse in MoE layer {layer}: expert {expert} has taken over "
                    f"{self.threshold:.0%} of token copies for {self.patience} steps "
                    f"(step {step}); "
                    "consider a larger train.aux_loss_coef or model.moe.expert_bias=true"
                )
        return messages
