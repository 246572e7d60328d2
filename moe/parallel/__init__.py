"""Parallelism applied to a plain single-device model from outside: expert parallelism
(all-to-all token exchange) and data parallelism over the rest of the world."""

from .apply import clip_grad_norm_, parallelize_experts, sync_gradients
from .dispatcher import AllToAllDispatcher
from .layout import ParallelLayout

__all__ = [
    "AllToAllDispatcher",
    "ParallelLayout",
    "clip_grad_norm_",
    "parallelize_experts",
    "sync_gradients",
]
