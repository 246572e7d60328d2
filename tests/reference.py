"""Naive references: a per-token loop MoE and a per-group loop GEMM, written for clarity.

They share no code with the package beyond torch primitives, so agreement means something.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def generator(seed: int) -> torch.Generator:
    """A seeded generator on the device tests create tensors on."""
    return torch.Generator(device=torch.get_default_device()).manual_seed(seed)


def on_cpu(test):
    """Run a test on the CPU even where the suite defaults to CUDA (CPU-specific behaviour)."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        with torch.device("cpu"):
            return test(*args, **kwargs)

    return wrapper


def act(h: Tensor, activation: str) -> Tensor:
    if activation == "swiglu":
        f = h.shape[-1] // 2
        return F.silu(h[..., :f]) * h[..., f:]
    return F.relu(h) if activation == "relu" else F.gelu(h)


def reference_gmm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """y[g] = x[g] @ w[e] per group, one group at a time."""
    out, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        out.append(x[start:end] @ w[e])
        start = end
    return torch.cat(out) if out else x.new_zeros(0, w.shape[2])


def kept_copies(ids, gates, num_experts, capacity, priority):
    """Set of (t, k) kept: visit copies by priority, each expert takes up to `capacity`."""
    T, K = ids.shape
    order = [(t, k) for k in range(K) for t in range(T)]  # (k, t): Switch/GShard order
    if priority == "gate":
        order.sort(key=lambda c: -float(gates[c]))  # stable: ties keep (k, t)
    taken = [0] * num_experts
    kept = set()
    for t, k in order:
        e = int(ids[t, k])
        if capacity is None or taken[e] < capacity:
            kept.add((t, k))
            taken[e] += 1
    return kept


def choose(scores, bias, top_k, n_group, topk_group):
    """One token's experts, by plain sorting: the best ``topk_group`` groups (each scored by
    its two best biased scores), then the best ``top_k`` experts among theirs."""
    biased = [float(s) + (0.0 if bias is None else float(bias[e])) for e, s in enumerate(scores)]
    size = len(biased) // n_group
    groups = [biased[g * size : (g + 1) * size] for g in range(n_group)]
    group_score = [sum(sorted(members, reverse=True)[:2]) for members in groups]
    best_groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
    allowed = [e for g in best_groups for e in range(g * size, (g + 1) * size)]
    return sorted(allowed, key=lambda e: -biased[e])[:top_k]


def reference_moe(
    x,
    router_w,
    w_in,
    w_out,
    *,
    top_k,
    activation="swiglu",
    gate_mode="switch",
    capacity=None,
    priority="sequence",
    expert_bias=None,
    score="softmax",
    n_group=1,
    topk_group=1,
    gate_scale=1.0,
):
    """Per-token loop MoE. Returns (y, aux_loss, z_loss, kept set)."""
    E = router_w.shape[0]
    T = x.shape[0]
    logits = x @ router_w.t()
    if score == "sigmoid":
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(-1, keepdim=True)
    else:
        scores = probs = torch.softmax(logits, dim=-1)
    ids = torch.tensor(
        [choose(scores[t].detach(), expert_bias, top_k, n_group, topk_group) for t in range(T)],
        dtype=torch.long,
    ).reshape(T, top_k)
    gates = scores.gather(1, ids)
    if gate_mode == "renormalize":
        gates = gates / gates.sum(-1, keepdim=True)
    gates = gates * gate_scale
    kept = kept_copies(ids, gates.detach(), E, capacity, priority)
    rows = []
    for t in range(T):
        y_t = torch.zeros_like(x[t])
        for k in range(top_k):
            if (t, k) in kept:
                e = int(ids[t, k])
                y_t = y_t + gates[t, k] * (w_out[e] @ act(w_in[e] @ x[t], activation))
        rows.append(y_t)
    y = torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])
    if T == 0:
        return y, None, None, kept
    frac = torch.stack([(ids == e).sum() for e in range(E)]).to(x.dtype) / (T * top_k)
    aux = E * (frac * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).pow(2).mean()
    return y, aux, z, kept
