"""The small transformer the model, export and expert-parallel tests build."""

from moe.model import ModelConfig

SMALL_MODEL = dict(
    vocab_size=256,
    d_model=32,
    n_layers=3,
    n_heads=4,
    n_kv_heads=2,
    d_ff=48,
    moe={"num_experts": 4, "top_k": 2, "d_ff": 24},
)


def small_model_config(**overrides) -> ModelConfig:
    """``SMALL_MODEL`` with ``overrides`` (a ``moe`` override replaces the whole section)."""
    return ModelConfig(**{**SMALL_MODEL, **overrides})
