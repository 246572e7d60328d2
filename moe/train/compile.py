"""``train.compile``: regional compilation, each transformer block compiled on its own.

Blocks repeat, so compiling one region per block keeps compile time flat in the depth and
leaves the parameters (and so checkpoints and optimizer state) where they were
(``nn.Module.compile`` compiles in place). On one process a block compiles as one graph
(``fullgraph=True``: the MoE layer has no host synchronisation and its grouped GEMM is an
opaque custom op); under expert parallelism the all-to-all needs host-side split sizes, so
the graph breaks there.
"""

from __future__ import annotations

import torch
from torch import nn


def wants_compile(setting: bool | str, device: torch.device) -> bool:
    """``auto`` compiles on CUDA (where it pays) and not on the CPU (where compiling costs
    minutes of a short run)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def compile_blocks(
    model: nn.Module, setting: bool | str, expert_parallel: bool, mode: str = "default"
) -> bool:
    """Compile each of ``model.blocks`` in place (``mode``: ``torch.compile``'s, which
    ``scripts/bench_train.py`` varies); returns whether it did."""
    if not wants_compile(setting, next(model.parameters()).device):
        return False
    if setting == "auto":  # the default must not stop a run: fall back to eager instead
        torch._dynamo.config.suppress_errors = True
    for block in model.blocks:
        block.compile(fullgraph=not expert_parallel, mode=mode)
    return True
