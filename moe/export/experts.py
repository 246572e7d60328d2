"""Chosen experts as safetensors files, with a JSON manifest of shapes, the model config
and each expert's routing statistics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors.torch import save_file

from moe.model import MoETransformer

from .routing import LayerRouting


def export_experts(
    model: MoETransformer,
    stats: list[LayerRouting],
    out: Path,
    layers: list[int] | None = None,
    experts: list[int] | None = None,
    source: str = "",
) -> dict:
    """One file per (MoE block, expert): ``block{B}_expert{E}.safetensors`` with
    ``gate_proj.weight [F, D]``, ``up_proj.weight [F, D]``, ``down_proj.weight [D, F]``.
    ``layers`` are block indices (default: every MoE block); ``experts`` expert ids
    (default: all)."""
    moe_blocks = {s.block: s for s in stats}
    chosen_blocks = sorted(moe_blocks) if layers is None else layers
    for b in chosen_blocks:
        if b not in moe_blocks:
            raise ValueError(f"block {b} has no MoE layer; MoE blocks: {sorted(moe_blocks)}")
    E = model.config.moe.num_experts
    chosen_experts = list(range(E)) if experts is None else experts
    bad = [e for e in chosen_experts if not 0 <= e < E]
    if bad:
        raise ValueError(f"expert ids {bad} out of range 0..{E - 1}")
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for b in chosen_blocks:
        layer = model.blocks[b].ffn.experts
        for e in chosen_experts:
            gate, up = layer.w_in_EHD[e].detach().chunk(2, dim=0)
            tensors = {
                "gate_proj.weight": gate.contiguous(),
                "up_proj.weight": up.contiguous(),
                "down_proj.weight": layer.w_out_EDF[e].detach().contiguous(),
            }
            name = f"block{b:02d}_expert{e:03d}.safetensors"
            save_file(tensors, str(out / name), metadata={"block": str(b), "expert": str(e)})
            entries.append(
                {
                    "block": b,
                    "expert": e,
                    "file": name,
                    "shapes": {k: list(v.shape) for k, v in tensors.items()},
                    "load_fraction": moe_blocks[b].load_fraction[e],
                    "mean_gate": moe_blocks[b].mean_gate[e],
                }
            )
    manifest = {
        "source_checkpoint": source,
        "model_config": dataclasses.asdict(model.config),
        "activation": "swiglu: down_proj(silu(gate_proj(x)) * up_proj(x))",
        "experts": entries,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
