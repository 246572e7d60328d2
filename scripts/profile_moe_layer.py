"""Where an MoE layer's forward+backward spends its time: a torch.profiler table.

python scripts/profile_moe_layer.py --experts 32 --dtype bfloat16
python scripts/profile_moe_layer.py --experts 32 --dtype bfloat16 --compile default [--dense]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from moe.layers import FeedForward, MoEConfig, MoELayer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=20, help="table rows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead"])
    p.add_argument("--dense", action="store_true", help="profile the dense FFN of width k*F")
    args = p.parse_args()

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=args.experts, top_k=args.top_k, d_ff=args.d_ff, backend=args.backend
    )
    if args.dense:
        layer = FeedForward(args.d_model, args.top_k * args.d_ff).to(args.device, dtype)
        run = layer
    else:
        layer = MoELayer(args.d_model, cfg).to(args.device, dtype)

        def run(x):
            return layer(x)[0]

    if args.compile != "none":
        run = torch.compile(run, fullgraph=True, mode=args.compile)
    x = torch.randn(args.tokens, args.d_model, device=args.device, dtype=dtype)
    grad = torch.randn_like(x)

    def step():
        for param in layer.parameters():
            param.grad = None
        torch.compiler.cudagraph_mark_step_begin()
        run(x.requires_grad_()).backward(grad)

    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if args.device == "cuda":
            torch.cuda.synchronize()
    table = prof.key_averages().table
    if args.device == "cuda":  # what the GPU does, then what the host does to keep it fed
        print(table(sort_by="self_cuda_time_total", row_limit=args.rows))
    print(table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
