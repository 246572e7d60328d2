"""Upcycling: an MoE model whose experts all start as copies of a dense model's FFN.

Sources: a dense checkpoint of ours (``model.moe_every=0``) or a dense Hugging Face Llama /
Qwen3 directory. Every MoE block's experts copy that block's dense SwiGLU FFN; attention,
norms and embeddings are copied; the router gets small random weights
(``normal(0, init_std)``), so routing starts near-uniform and breaks symmetry.

What equals the dense model at step 0: with ``gate_mode=renormalize`` the gates of a token
sum to 1 over identical experts, so the output equals the dense model's exactly (up to float
rounding). With Switch gates (``gate_mode=switch``) each MoE FFN output is the dense FFN
output scaled by the chosen experts' summed router probability (1/E on average at top-1),
so only the attention path is unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from moe.hf import UnsupportedModel, read_hf_config, read_hf_model
from moe.layers import MoEConfig
from moe.model import ModelConfig, MoETransformer

from .hf import UnsupportedExport


def upcycled_config(dense: ModelConfig, moe: MoEConfig, moe_every: int = 1) -> ModelConfig:
    if dense.moe_every != 0:
        raise ValueError("the source must be a dense model (model.moe_every=0)")
    if moe.d_ff != dense.d_ff or moe.activation != "swiglu":
        moe = dataclasses.replace(moe, d_ff=dense.d_ff, activation="swiglu")
    return dataclasses.replace(dense, moe_every=moe_every, moe=moe)


@torch.no_grad()
def upcycle(dense: MoETransformer, moe: MoEConfig, moe_every: int = 1) -> MoETransformer:
    cfg = upcycled_config(dense.config, moe, moe_every)
    model = MoETransformer(cfg)
    source = dense.state_dict()
    for name, tensor in model.state_dict().items():
        if name in source:
            tensor.copy_(source[name])
    for i, block in enumerate(model.blocks):
        if block.is_moe:
            dense_ffn = dense.blocks[i].ffn
            block.ffn.experts.w_in_EHD.copy_(
                dense_ffn.w_in.weight.expand_as(block.ffn.experts.w_in_EHD)
            )
            block.ffn.experts.w_out_EDF.copy_(
                dense_ffn.w_out.weight.expand_as(block.ffn.experts.w_out_EDF)
            )
            torch.nn.init.normal_(block.ffn.router.weight_ED, std=cfg.init_std)
    return model.eval()


def dense_from_hf(directory: Path) -> MoETransformer:
    """A dense model of ours holding a Hugging Face Llama or Qwen3 checkpoint's weights."""
    kind = read_hf_config(directory).get("model_type")
    if kind not in ("llama", "qwen3"):
        raise UnsupportedExport(f"model_type {kind!r}: upcycling reads llama or qwen3 models")
    try:
        return read_hf_model(directory)
    except UnsupportedModel as err:
        raise UnsupportedExport(f"cannot represent {directory}: {err}") from None
