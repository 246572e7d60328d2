"""The Python API: load a trained model from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from moe.model import MoETransformer
from moe.train.checkpoint import complete_checkpoints, load_checkpoint, read_config
from moe.train.config import RunConfig


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest complete checkpoint)."""
    path = Path(path)
    if (path / "complete.json").exists():
        return path
    found = complete_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"no complete checkpoint at {path}")
    return found[-1]


def load_run_config(checkpoint: str | Path) -> RunConfig:
    return RunConfig.from_dict(read_config(resolve_checkpoint(checkpoint)))


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> MoETransformer:
    """The model of a checkpoint, in eval mode. ``model(input_ids)`` returns an object with
    ``.logits`` [B, S, vocab]."""
    path = resolve_checkpoint(checkpoint)
    model = MoETransformer(load_run_config(path).model)
    load_checkpoint(path, model)
    return model.to(device).eval()


def load_tokenizer(checkpoint: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(resolve_checkpoint(checkpoint) / "tokenizer.json"))
