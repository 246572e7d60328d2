"""Single-device MoE building blocks: router, experts, dispatcher, MoE layer, dense FFN."""

from .config import ACTIVATIONS, GATE_MODES, MoEConfig
from .dispatcher import LocalDispatcher
from .experts import GroupedExperts, expert_parameters, is_expert_param
from .ffn import FeedForward
from .moe_layer import MoEAux, MoELayer
from .router import Router, RouterOutput

__all__ = [
    "ACTIVATIONS",
    "GATE_MODES",
    "FeedForward",
    "GroupedExperts",
    "expert_parameters",
    "is_expert_param",
    "LocalDispatcher",
    "MoEAux",
    "MoEConfig",
    "MoELayer",
    "Router",
    "RouterOutput",
]
