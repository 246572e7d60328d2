"""The MoE layer: router -> dispatcher -> experts -> combine.

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from .config import MoEConfig
from .dispatcher import LocalDispatcher
from .experts import GroupedExperts
from .ffn import FeedForward
from .router import Router


@dataclass
class MoEAux:
    """Auxiliary losses (with gradient) and routing statistics (without) of one forward.

    aux_loss, z_loss: see ``RouterOutput``; scale them by their coefficients in the loss.
    routed_E: token copies of this process's tokens assigned to each expert before capacity.
    kept_E: token copies each of all E experts processed, over every process's tokens
        (under expert/data parallelism the world's micro-batch: the same on every rank and
        the same as one process on that micro-batch).
    dropped_fraction: share of those token copies dropped by capacity (0 when dropless).
    entropy: mean routing entropy (nats).
    """

    aux_loss: Tensor
    z_loss: Tensor
    routed_E: Tensor
    kept_E: Tensor
    dropped_fraction: Tensor
    entropy: Tensor


class MoELayer(nn.Module):
    """Switch-style MoE FFN, plus an optional shared expert every token passes through.
    ``forward(x[..., D]) -> (y[..., D], MoEAux)``.

    A dropped token copy contributes zero here; the block's residual carries the token.
    """

    def __init__(self, d_model: int, config: MoEConfig):
        super().__init__()
        self.config = config
        self.router = Router(d_model, config)
        self.experts = GroupedExperts(
            config.num_experts, d_model, config.d_ff, config.activation, config.backend
        )
        self.dispatcher = LocalDispatcher(config)
        # A shared expert is dense: every rank holds it whole, as attention.
        self.shared = FeedForward(d_model, config.shared_d_ff) if config.shared_d_ff else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if config.shared_gate else None

    def forward(self, x: Tensor, load_E: Tensor | None = None) -> tuple[Tensor, MoEAux]:
        """``x``: ``[..., S, D]`` (rows of one sequence consecutive). ``load_E``: token copies
        per expert over the last optimizer step's global batch (``balance="global"``)."""
        x_TD = rearrange(x, "... d -> (...) d")
        seq_len = x.shape[-2] if x.dim() >= 3 else None
        route = self.router(x_TD, seq_len, load_E, self.dispatcher.world_sum)
        x_ND, offsets_E, handle = self.dispatcher.dispatch(x_TD, route.ids_TK, route.gates_TK)
        y_ND = self.experts(x_ND, offsets_E, zero_tail=not self.config.dropless)
        y_TD = self.dispatcher.combine(y_ND, route.gates_TK, handle)
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                shared_TD = shared_TD * torch.sigmoid(self.shared_gate(x_TD))
            y_TD = y_TD + shared_TD
        kept_E, routed_E = self.dispatcher.routing_counts(handle)
        dropped = (routed_E.sum() - kept_E.sum()) / routed_E.sum().clamp_min(1)
        aux = MoEAux(
            aux_loss=route.aux_loss,
            z_loss=route.z_loss,
            routed_E=route.routed_E,
            kept_E=kept_E,
            dropped_fraction=dropped.float(),
            entropy=route.entropy,
        )
        return y_TD.reshape(x.shape), aux
