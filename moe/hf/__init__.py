"""Hugging Face model directories: which open MoE families we represent exactly, and reading
their configs (``moe.hf.families``) and weights (``moe.hf.weights``, ``moe.hf.reading``) into
our model."""

from .families import FAMILIES, UnsupportedModel, family_of
from .reading import is_hf_directory, read_hf_config, read_hf_model

__all__ = [
    "FAMILIES",
    "UnsupportedModel",
    "family_of",
    "is_hf_directory",
    "read_hf_config",
    "read_hf_model",
]
