"""Experts with stacked weights, so one grouped GEMM serves all of them.

Shape legend: N rows in expert order, E experts, D model dim, F hidden dim,
H input-projection rows (2F for SwiGLU, F otherwise), I and O a GEMM's input and output
dims (D and H, or F and D).

Weights use the ``nn.Linear`` / Hugging Face layout ``[E, out, in]``: ``w_in_EHD`` is
``[E, H, D]`` (SwiGLU: gate rows then up rows, like Qwen3-MoE's ``gate_up_proj``) and
``w_out_EDF`` is ``[E, D, F]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe.kernels import grouped_mm

from .ffn import activate, init_projection_, projection_rows


class GroupedExperts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str = "swiglu",
        backend: str = "auto",
    ):
        super().__init__()
        self.activation = activation
        self.backend = backend
        H = projection_rows(activation, d_ff)
        self.w_in_EHD = nn.Parameter(torch.empty(num_experts, H, d_model))
        self.w_out_EDF = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        init_projection_(self.w_in_EHD, fan_in=d_model)
        init_projection_(self.w_out_EDF, fan_in=d_ff)
        # The layer's index of this module's first expert (expert parallelism keeps a slice).
        self.first_expert = 0

    @property
    def num_experts(self) -> int:
        return self.w_in_EHD.shape[0]

    def _grouped_mm(
        self, x_NI: Tensor, w_EOI: Tensor, offsets_E: Tensor, zero_tail: bool = True
    ) -> Tensor:
        """The one seam for the expert GEMM: ``x[g] @ w[e].T`` per group.

        Override it to swap in another kernel; everything else stays.
        """
        w_EIO = w_EOI.transpose(1, 2)
        return grouped_mm(x_NI, w_EIO, offsets_E, self.backend, zero_tail=zero_tail)

    def forward(self, x_ND: Tensor, offsets_E: Tensor, zero_tail: bool = True) -> Tensor:
        """x_ND: rows grouped by expert; offsets_E: int32 group ends. Returns [N, D].

        ``zero_tail=False``: every row belongs to a group (a dropless layer), so the GEMMs
        need not zero the rows past the groups (``moe.kernels.grouped_mm``)."""
        h_NH = self._grouped_mm(x_ND, self.w_in_EHD, offsets_E, zero_tail)
        h_NF = activate(h_NH, self.activation)
        return self._grouped_mm(h_NF, self.w_out_EDF, offsets_E, zero_tail)


EXPERT_WEIGHTS = ("w_in_EHD", "w_out_EDF")


def is_expert_param(name: str) -> bool:
    """Whether a parameter's qualified name (or a state-dict key: optimizer state and
    checkpoints are keyed by it) names an expert weight, the one answer to that question."""
    module, _, leaf = name.rpartition(".")
    return leaf in EXPERT_WEIGHTS and module.endswith("experts")


def expert_parameters(model: nn.Module) -> set[int]:
    """``id`` of every expert weight in ``model``."""
    return {id(p) for name, p in model.named_parameters() if is_expert_param(name)}
