"""Where metrics go: ``metrics.jsonl`` in the run directory, Weights & Biases, and the
console's progress bar."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed

from moe.checkpoint import write_text_atomic

from .config import WandbSection


class StepStats:
    """What one optimizer step reports, summed over its micro-batches: the losses, the
    MoE layers' mean dropped fraction and routing entropy, and each layer's expert loads."""

    def __init__(self):
        self.sums = dict.fromkeys(
            ("loss", "lm_loss", "aux_loss", "z_loss", "dropped_fraction", "router_entropy"), 0.0
        )
        self.loads: list[torch.Tensor] | None = None

    def add(self, loss: torch.Tensor, ce: torch.Tensor, out) -> None:
        """One micro-batch: its total ``loss``, LM loss ``ce`` and the model output."""
        for key, value in (("loss", loss), ("lm_loss", ce), ("aux_loss", out.aux_loss)):
            self.sums[key] += value.item()
        self.sums["z_loss"] += out.z_loss.item()
        if out.moe:
            layers = len(out.moe)
            self.sums["dropped_fraction"] += (
                sum(a.dropped_fraction.item() for a in out.moe) / layers
            )
            self.sums["router_entropy"] += sum(a.entropy.item() for a in out.moe) / layers
            micro = [a.routed_E.detach().cpu() for a in out.moe]
            self.loads = (
                micro
                if self.loads is None
                else [a + b for a, b in zip(self.loads, micro, strict=True)]
            )

    def over_ranks(self, world, micro_batches: int) -> tuple[dict, list[torch.Tensor] | None]:
        """Means per micro-batch over every rank, and loads summed over every rank: every
        rank must agree on what it logs and whether it updates."""
        totals = world.sum(list(self.sums.values()))
        means = {k: v / world.size / micro_batches for k, v in zip(self.sums, totals, strict=True)}
        loads = self.loads
        if loads is not None and world.size > 1:
            stacked = torch.stack(loads)
            torch.distributed.all_reduce(stacked)
            loads = list(stacked)
        return means, loads


class MetricsLog:
    """Appends one JSON object per line; W&B gets the same numbers plus load histograms."""

    def __init__(self, run_dir: Path, wandb_cfg: WandbSection, config: dict, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        wandb_cfg = wandb_cfg.resolved(os.environ)
        if enabled and wandb_cfg.mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                group=wandb_cfg.group,
                name=wandb_cfg.name or run_dir.name,
                mode=wandb_cfg.mode,
                dir=wandb_cfg.dir or str(run_dir),
                config=config,
                reinit="finish_previous",
            )

    def write(self, record: dict, expert_loads: list[torch.Tensor] | None = None) -> None:
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            payload = {
                (f"val/{k}" if record.get("split") == "val" else f"train/{k}"): v
                for k, v in clean.items()
                if k not in ("step", "split")
            }
            for i, load in enumerate(expert_loads or []):
                counts = load.double().cpu().numpy()
                payload[f"moe/layer{i}/expert_load"] = self.wandb_histogram(counts)
            self.wandb.log(payload, step=record["step"])

    @staticmethod
    def wandb_histogram(counts: np.ndarray):
        import wandb

        return wandb.Histogram(np_histogram=(counts, np.arange(len(counts) + 1)))

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            self.wandb.summary.update({k: _plain(v) for k, v in values.items()})

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut short by a crash
            continue
    return records


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop lines after ``step`` (and a line cut short by a crash) before a resumed run
    writes them again, so each step appears once."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    write_text_atomic(path, "".join(k + "\n" for k in kept))
