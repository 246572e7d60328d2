"""Checkpoints: atomic, checksummed, sharded (``torch.distributed.checkpoint``) saves and
loads of a run, model-only checkpoints, and reading any of them into a model."""

from .dcp import (
    complete_checkpoints,
    load_checkpoint,
    newest_good_checkpoint,
    read_config,
    save_checkpoint,
    save_model_checkpoint,
    verify_checkpoint,
)
from .files import CheckpointError, write_text_atomic
from .reading import check_compatible, load_model, load_tokenizer, model_config, resolve_checkpoint

__all__ = [
    "CheckpointError",
    "check_compatible",
    "complete_checkpoints",
    "load_checkpoint",
    "load_model",
    "load_tokenizer",
    "model_config",
    "newest_good_checkpoint",
    "read_config",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_model_checkpoint",
    "verify_checkpoint",
    "write_text_atomic",
]
