"""Reading a checkpoint outside training: the model (``load_model``, also ``from moe import
load_model``), its tokenizer, and the checks that a checkpoint fits a model config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moe.hf import is_hf_directory, read_hf_model
from moe.model import ModelConfig, MoETransformer
from moe.model.config import MOE_WEIGHT_SHAPE_FIELDS, WEIGHT_SHAPE_FIELDS
from moe.typed_config import ConfigError, from_dict

from .dcp import complete_checkpoints, load_checkpoint, read_config


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest complete checkpoint)."""
    path = Path(path)
    if (path / "complete.json").exists():
        return path
    found = complete_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"no complete checkpoint at {path}")
    return found[-1]


def model_config(checkpoint: str | Path) -> ModelConfig:
    """The model config a checkpoint was written with (its ``config.json``)."""
    return stored_model_config(read_config(resolve_checkpoint(checkpoint))["model"])


def stored_model_config(stored: dict) -> ModelConfig:
    """A stored model config, keys of other versions dropped and later defaults filled in."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return from_dict(ModelConfig, {k: v for k, v in stored.items() if k in known}, "model.")


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> MoETransformer:
    """The model of a checkpoint, or of a Hugging Face directory of a supported family
    (``moe.hf``), in eval mode. ``model(input_ids)`` returns an object with ``.logits``
    [B, S, vocab]."""
    if is_hf_directory(checkpoint):
        return read_hf_model(checkpoint).to(device).eval()
    path = resolve_checkpoint(checkpoint)
    model = MoETransformer(model_config(path))
    load_checkpoint(path, model)
    return model.to(device).eval()


def load_tokenizer(checkpoint: str | Path) -> Tokenizer:
    """A checkpoint's tokenizer, or a Hugging Face directory's own ``tokenizer.json``."""
    if is_hf_directory(checkpoint):
        path = Path(checkpoint) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{checkpoint} has no tokenizer.json (a fast tokenizer)")
        return Tokenizer.from_file(str(path))
    return Tokenizer.from_file(str(resolve_checkpoint(checkpoint) / "tokenizer.json"))


def check_compatible(path: Path, current: ModelConfig) -> None:
    """Refuse a checkpoint of another model shape before loading anything from it."""
    stored = dataclasses.asdict(stored_model_config(read_config(path)["model"]))
    mine = dataclasses.asdict(current)
    for key in WEIGHT_SHAPE_FIELDS:
        if stored.get(key) != mine[key]:
            raise ConfigError(
                f"checkpoint {path} has model.{key}={stored.get(key)}, this "
                f"run model.{key}={mine[key]}; resume with a matching model"
            )
    for key in MOE_WEIGHT_SHAPE_FIELDS:
        if stored["moe"].get(key) != mine["moe"][key]:
            raise ConfigError(
                f"checkpoint {path} has model.moe.{key}={stored['moe'].get(key)}, this run "
                f"model.moe.{key}={mine['moe'][key]}; resume with a matching model"
            )
