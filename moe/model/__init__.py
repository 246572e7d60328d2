"""Decoder-only MoE transformer built from ``moe.layers``."""

from .config import ModelConfig
from .transformer import CHECKPOINTING, Block, ModelOutput, MoETransformer

__all__ = ["CHECKPOINTING", "Block", "ModelConfig", "ModelOutput", "MoETransformer"]
