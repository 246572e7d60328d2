"""Peer MoE layers built with the same weights as one of ours, for side-by-side timing.

Each builder returns an ``Impl`` (a module and its ``x_TD -> y_TD`` call) or, when the
peer cannot run this configuration, a string saying why. Weights are copied, so every
implementation computes the same function (the benchmark prints how far each peer's output
is from ours).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moe.layers import FeedForward, MoELayer


@dataclass
class Impl:
    name: str
    module: nn.Module
    run: Callable[[Tensor], Tensor]


def _single_process_group() -> None:
    """DeepSpeed's MoE layer wants its distributed state even for one process."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        store = os.path.join(tempfile.mkdtemp(prefix="moe-bench-"), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def deepspeed_moe(ours: MoELayer, d_model: int) -> Impl | str:
    """``deepspeed.moe.layer.MoE`` with our router and expert weights (dropless)."""
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed not installed"
    cfg = ours.config
    if cfg.top_k > 2 or cfg.activation != "swiglu":
        return "DeepSpeed-MoE supports top-1/top-2 only"
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.moe.layer import MoE

    _single_process_group()
    expert = FeedForward(d_model, cfg.d_ff, cfg.activation)
    layer = MoE(
        d_model,
        expert,
        num_experts=cfg.num_experts,
        ep_size=1,
        k=cfg.top_k,
        drop_tokens=False,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    )
    layer.set_deepspeed_parallelism()
    dtype = ours.experts.w_in_EHD.dtype
    layer.to(device=ours.experts.w_in_EHD.device, dtype=dtype)
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.float().weight.copy_(ours.router.weight_ED)
        for e, ffn in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            ffn.w_in.weight.copy_(ours.experts.w_in_EHD[e])
            ffn.w_out.weight.copy_(ours.experts.w_out_EDF[e])

    return Impl("deepspeed", layer, lambda x_TD: layer(x_TD.unsqueeze(0))[0].squeeze(0))


def transformers_moe(ours: MoELayer, d_model: int, implementation: str = "eager") -> Impl | str:
    """``transformers``' Qwen3-MoE sparse block with our weights."""
    if importlib.util.find_spec("transformers") is None:
        return "transformers not installed"
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = ours.config
    if cfg.activation != "swiglu":
        return "Qwen3-MoE experts are SwiGLU"
    hf_cfg = Qwen3MoeConfig(
        hidden_size=d_model,
        moe_intermediate_size=cfg.d_ff,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        norm_topk_prob=cfg.gate_mode == "renormalize",
    )
    hf_cfg._experts_implementation = implementation
    block = Qwen3MoeSparseMoeBlock(hf_cfg)
    block.to(device=ours.experts.w_in_EHD.device, dtype=ours.experts.w_in_EHD.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight_ED)
        block.experts.gate_up_proj.copy_(ours.experts.w_in_EHD)
        block.experts.down_proj.copy_(ours.experts.w_out_EDF)

    name = "transformers" if implementation == "eager" else f"transformers_{implementation}"
    return Impl(name, block, lambda x_TD: block(x_TD.unsqueeze(0)).squeeze(0))
