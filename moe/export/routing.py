"""Routing statistics of every MoE layer, measured on calibration sequences."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe.data import PackedSequences
from moe.model import MoETransformer


@dataclass
class LayerRouting:
    """block: index of the transformer block. load_fraction[e]: share of token copies routed
    to expert e. mean_gate[e]: mean combine weight of those copies (0 if none)."""

    block: int
    load_fraction: list[float]
    mean_gate: list[float]


@torch.no_grad()
def routing_stats(
    model: MoETransformer, data: PackedSequences, sequences: int, batch_size: int = 8
) -> list[LayerRouting]:
    blocks = [i for i, b in enumerate(model.blocks) if b.is_moe]
    E = model.config.moe.num_experts
    counts = {i: torch.zeros(E, dtype=torch.float64) for i in blocks}
    gate_sums = {i: torch.zeros(E, dtype=torch.float64) for i in blocks}

    def recorder(block_index):
        def hook(module, inputs, route):
            ids = route.ids_TK.reshape(-1).cpu()
            counts[block_index].index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
            gate_sums[block_index].index_add_(0, ids, route.gates_TK.reshape(-1).double().cpu())

        return hook

    handles = [model.blocks[i].ffn.router.register_forward_hook(recorder(i)) for i in blocks]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for start in range(0, sequences, batch_size):
            indices = torch.arange(start, min(start + batch_size, sequences)) % data.count
            inputs, _ = data.batch(indices)
            model(inputs.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    stats = []
    for i in blocks:
        total = counts[i].sum().clamp_min(1)
        mean_gate = torch.where(counts[i] > 0, gate_sums[i] / counts[i].clamp_min(1), 0.0)
        stats.append(LayerRouting(i, (counts[i] / total).tolist(), mean_gate.tolist()))
    return stats
