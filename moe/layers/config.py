"""Typed configuration of one MoE layer, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from moe.kernels import BACKENDS, PRIORITIES, expert_capacity

ACTIVATIONS = ("swiglu", "relu", "gelu")
GATE_MODES = ("switch", "renormalize")
SCORES = ("softmax", "sigmoid")
BALANCES = ("global", "micro", "sequence")


@dataclass
class MoEConfig:
    """Knobs of a Switch-style MoE layer.

    num_experts: experts in the layer (E).
    top_k: experts per token (K); 1 is Switch.
    d_ff: hidden width of each expert (F).
    capacity_factor: each expert takes at most ``ceil(cf * T * K / E)`` token copies;
        <= 0 is dropless (no copy is ever dropped).
    capacity_priority: which copies survive a full expert: "sequence" (Switch; under
        expert or data parallelism over all ranks' tokens) or "gate" (each rank's own).
    score: how router logits become expert scores: "softmax" over the experts (Switch) or
        "sigmoid" of each logit on its own (DeepSeek-V3); gates are the chosen scores.
    gate_mode: "switch" uses the score of the chosen expert as its gate (unnormalized);
        "renormalize" rescales the top-k scores to sum to 1.
    n_group / topk_group: group-limited routing (DeepSeek-V3): the experts form ``n_group``
        equal groups, each group is ranked by the sum of its two best scores, and a token
        chooses its top-k among the experts of its ``topk_group`` best groups (under expert
        parallelism, a group per rank bounds how many ranks a token visits); 1 / 1 = off.
    activation: "swiglu" (default), or "relu"/"gelu" as in the Switch paper.
    jitter: multiplicative noise amplitude on the router input in training (0 = off).
    expert_bias: keep an aux-loss-free balancing bias that shifts expert selection only
        (DeepSeek-V3 style); it is updated by ``Router.update_expert_bias`` outside forward.
    balance: over which tokens the load-balancing loss ``E * sum_i f_i * P_i`` takes the
        expert frequencies f_i: "global" (the last optimizer step's global batch, all
        micro-batches and ranks, passed in by the caller as ``load_E``; the loss and its
        gradients then do not depend on how the batch is split; without ``load_E`` it acts
        as "micro"), "micro" (the tokens of this forward, over all data-parallel ranks) or
        "sequence" (each sequence on its own, averaged; DeepSeek-V3's sequence-wise loss).
    gate_scale: constant factor on the combine weights (DeepSeek's
        ``routed_scaling_factor``); 1 keeps Switch's formulation exactly.
    shared_d_ff: width of a shared SwiGLU expert that every token passes through besides
        its routed ones (Qwen2-MoE, DeepSeek); 0 = none.
    shared_gate: scale the shared expert's output by ``sigmoid(w_g x)``, a learned
        per-token gate (Qwen2-MoE's ``shared_expert_gate``).
    backend: grouped GEMM and dispatch kernels: "auto", "loop", "torch", "triton",
        "avx512" or "avx2" (``moe.kernels.BACKENDS``).
    """

    num_experts: int = 8
    top_k: int = 1
    d_ff: int = 1024
    capacity_factor: float = 0.0
    capacity_priority: str = "sequence"
    score: str = "softmax"
    gate_mode: str = "switch"
    n_group: int = 1
    topk_group: int = 1
    activation: str = "swiglu"
    jitter: float = 0.0
    expert_bias: bool = False
    balance: str = "global"
    gate_scale: float = 1.0
    shared_d_ff: int = 0
    shared_gate: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must be between 1 and num_experts ({self.num_experts}), got {self.top_k}"
            )
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ValueError(
                f"n_group must divide num_experts ({self.num_experts}), got {self.n_group}"
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group must be between 1 and n_group, got {self.topk_group}")
        if self.top_k > self.topk_group * self.num_experts // self.n_group:
            raise ValueError(
                f"top_k ({self.top_k}) exceeds the experts of topk_group ({self.topk_group}) "
                f"groups of {self.num_experts // self.n_group}; raise topk_group"
            )
        if self.d_ff < 1:
            raise ValueError(f"d_ff must be >= 1, got {self.d_ff}")
        if self.shared_d_ff < 0 or (self.shared_gate and not self.shared_d_ff):
            raise ValueError("shared_d_ff must be >= 0, and > 0 for shared_gate=true")
        if not self.gate_scale > 0:
            raise ValueError(f"gate_scale must be > 0, got {self.gate_scale}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")
        for name, value, allowed in (
            ("capacity_priority", self.capacity_priority, PRIORITIES),
            ("score", self.score, SCORES),
            ("gate_mode", self.gate_mode, GATE_MODES),
            ("balance", self.balance, BALANCES),
            ("activation", self.activation, ACTIVATIONS),
            ("backend", self.backend, BACKENDS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    @property
    def dropless(self) -> bool:
        """No token copy is ever dropped (``capacity_factor <= 0``)."""
        return self.capacity_factor <= 0

    def capacity(self, num_tokens: int) -> int | None:
        """Copies each expert may take from ``num_tokens`` tokens; None when dropless."""
        if self.dropless:
            return None
        return expert_capacity(self.capacity_factor, num_tokens, self.top_k, self.num_experts)
