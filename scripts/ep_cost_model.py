"""How a training step's time splits into compute and expert-parallel all-to-all, per MoE
layer and GPU, at 8, 64 and 512 GPUs: arithmetic from stated assumptions, no measurement.
Every number it uses is a flag; ``docs/expert_parallel_cost_model.md`` holds its output.

Per GPU, per MoE layer and micro-batch of T tokens (uniform routing):
- compute = T * flops_per_token_layer / (peak * mfu), with flops_per_token_layer =
  6 * (attention + router + k experts' parameters) + 12 * seq * d (attention scores);
- all-to-all bytes sent = 4 * T * k * d * bytes * (EP-1)/EP: dispatch and combine, forward
  and backward (the same formula ``scripts/bench_dispatch.py`` checks against measured
  volumes). Of the EP-1 destinations, those on other nodes go over the network:
  time = max(on-node bytes / NVLink bandwidth, off-node bytes / network bandwidth)
  + 4 * latency.

    python scripts/ep_cost_model.py
    python scripts/ep_cost_model.py --inter-gbps 25 --mfu 0.35
"""

from __future__ import annotations

import argparse


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    m = p.add_argument_group("model (every layer MoE)")
    m.add_argument("--d-model", type=int, default=2048)
    m.add_argument("--layers", type=int, default=28)
    m.add_argument("--heads", type=int, default=16)
    m.add_argument("--kv-heads", type=int, default=16)
    m.add_argument("--vocab", type=int, default=102400)
    m.add_argument("--experts", type=int, default=64)
    m.add_argument("--top-k", type=int, default=6)
    m.add_argument("--d-ff", type=int, default=1408, help="SwiGLU width of each expert")
    m.add_argument("--seq-len", type=int, default=4096)
    m.add_argument("--tokens-per-gpu", type=int, default=8192, help="per micro-batch")
    m.add_argument("--bytes", type=int, default=2, help="activation bytes (bf16: 2)")
    h = p.add_argument_group("hardware (H100 SXM nodes of 8, NDR InfiniBand)")
    h.add_argument("--gpus-per-node", type=int, default=8)
    h.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak")
    h.add_argument("--mfu", type=float, default=0.45, help="fraction of peak the GEMMs reach")
    h.add_argument("--intra-gbps", type=float, default=300.0, help="NVLink all-to-all GB/s per GPU")
    h.add_argument("--inter-gbps", type=float, default=40.0, help="network all-to-all GB/s per GPU")
    h.add_argument("--intra-latency-us", type=float, default=10.0)
    h.add_argument("--inter-latency-us", type=float, default=30.0)
    p.add_argument("--gpus", default="8,64,512")
    return p.parse_args()


def attention_params(a) -> int:
    head_dim = a.d_model // a.heads
    return 2 * a.d_model * a.d_model + 2 * a.d_model * a.kv_heads * head_dim


def flops_per_token_layer(a) -> float:
    experts = a.top_k * 3 * a.d_model * a.d_ff
    router = a.d_model * a.experts
    return 6 * (attention_params(a) + experts + router) + 12 * a.seq_len * a.d_model


def memory_gb(a, gpus: int, ep: int) -> float:
    """Weights and gradients in bf16 plus fp32 master weights and AdamW moments (12 bytes)
    partitioned by ZeRO: expert state over the expert-data-parallel group, dense state over
    all GPUs. Activations not included."""
    experts = a.layers * (a.experts // ep) * 3 * a.d_model * a.d_ff
    dense = a.layers * (attention_params(a) + a.d_model * a.experts) + 2 * a.vocab * a.d_model
    return (experts * (4 + 12 / (gpus // ep)) + dense * (4 + 12 / gpus)) / 1e9


def layer_costs(a, ep: int) -> dict:
    flops = a.tokens_per_gpu * flops_per_token_layer(a)
    compute_ms = flops / (a.peak_tflops * 1e12 * a.mfu) * 1e3
    sent = 4 * a.tokens_per_gpu * a.top_k * a.d_model * a.bytes * (ep - 1) / ep
    peers = ep - 1
    on_node_peers = min(ep, a.gpus_per_node) - 1
    off_node = sent * (peers - on_node_peers) / peers if peers else 0.0
    on_node = sent - off_node
    spans_nodes = off_node > 0
    latency_us = a.inter_latency_us if spans_nodes else a.intra_latency_us
    comm_ms = max(on_node / (a.intra_gbps * 1e9), off_node / (a.inter_gbps * 1e9)) * 1e3 + (
        4 * latency_us / 1e3 if peers else 0.0
    )
    return {
        "compute_ms": compute_ms,
        "sent_MB": sent / 1e6,
        "off_node_MB": off_node / 1e6,
        "comm_ms": comm_ms,
        "comm_share": comm_ms / (comm_ms + compute_ms),
    }


def layouts(gpus: int, a) -> list[int]:
    """EP degrees worth comparing: within one node, and as wide as the experts allow."""
    options = {min(a.gpus_per_node, gpus, a.experts), min(gpus, a.experts)}
    return sorted(ep for ep in options if gpus % ep == 0 and a.experts % ep == 0)


def main() -> None:
    a = parse_args()
    head_dim = a.d_model // a.heads
    expert_params = 3 * a.d_model * a.d_ff
    print(
        f"model: d={a.d_model}, {a.layers} layers (all MoE), {a.heads} heads / {a.kv_heads} KV "
        f"(head dim {head_dim}), {a.experts} SwiGLU experts f={a.d_ff} "
        f"({expert_params / 1e6:.1f}M each), top-{a.top_k}, seq {a.seq_len}, "
        f"{a.tokens_per_gpu} tokens per GPU per micro-batch, {a.bytes}-byte activations"
    )
    print(
        f"hardware: {a.peak_tflops:.0f} TFLOP/s x {a.mfu:.0%} MFU; all-to-all "
        f"{a.intra_gbps:.0f} GB/s per GPU in a node of {a.gpus_per_node}, "
        f"{a.inter_gbps:.0f} GB/s across nodes; latency {a.intra_latency_us:.0f} / "
        f"{a.inter_latency_us:.0f} us per all-to-all"
    )
    header = ["GPUs", "EP x DP", "experts/GPU", "GB/GPU", "compute ms", "sent MB", "off-node MB"]
    header += ["all-to-all ms", "all-to-all share", "step s (no overlap)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for gpus in [int(g) for g in a.gpus.split(",")]:
        for ep in layouts(gpus, a):
            c = layer_costs(a, ep)
            step_s = a.layers * (c["compute_ms"] + c["comm_ms"]) / 1e3
            print(
                f"| {gpus} | {ep} x {gpus // ep} | {a.experts // ep} "
                f"| {memory_gb(a, gpus, ep):.0f} | {c['compute_ms']:.2f} "
                f"| {c['sent_MB']:.1f} | {c['off_node_MB']:.1f} | {c['comm_ms']:.2f} "
                f"| {c['comm_share']:.0%} | {step_s:.2f} |"
            )


if __name__ == "__main__":
    main()
