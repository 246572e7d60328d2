"""The experts alone (two grouped GEMMs and the activation, forward+backward) against the
dense FFN of equal active FLOPs: the ceiling of the MoE layer's ``%dense``.

The MoE layer adds routing, permute and combine to this; whatever share of dense the
experts alone reach, the layer cannot beat. Each repetition draws fresh group sizes from
a random router (softmax over E of Gaussian logits, top-k), as training does.

    python scripts/bench_expert_gemms.py
    python scripts/bench_expert_gemms.py --tokens 16384 --d-model 1024 --d-ff 2048 --compile default
"""

from __future__ import annotations

import moe  # noqa: F401  first, as in moe-train: torch's allocator options (moe/__init__.py)

# isort: split
import argparse
import json
import statistics

import torch
from bench_grid import DTYPES, add_grid_args
from bench_timing import fwd_bwd_time
from moe.kernels import count_per_expert
from moe_peers import Impl

from moe.layers import FeedForward, GroupedExperts


def group_ends(T: int, E: int, k: int, g: torch.Generator, device: str) -> torch.Tensor:
    """Group ends of T*k token copies under a random top-k router."""
    ids_TK = torch.randn(T, E, generator=g).topk(k, dim=-1).indices
    return torch.cumsum(count_per_expert(ids_TK, E), 0).to(device, torch.int32)


def bench(args, E: int, k: int, dtype_name: str) -> dict:
    dtype, device = DTYPES[dtype_name], args.device
    T, D, F = args.tokens, args.d_model, args.d_ff
    torch.manual_seed(0)
    experts = GroupedExperts(E, D, F).to(device, dtype)
    dense = FeedForward(D, k * F).to(device, dtype)
    g = torch.Generator().manual_seed(1)
    offsets = group_ends(T, E, k, g, device)

    def run_experts(x_ND):  # offsets are set before each call, outside the timed region
        return experts(x_ND, offsets, zero_tail=False)

    impls = [Impl("experts", experts, run_experts), Impl("dense", dense, dense)]
    if args.compile != "none":
        torch._dynamo.reset()
        impls = [
            Impl(i.name, i.module, torch.compile(i.run, fullgraph=True, mode=args.compile))
            for i in impls
        ]
    rows = {"experts": T * k, "dense": T}
    times = {"experts": [], "dense": []}
    for rep in range(args.warmup + args.reps):
        offsets.copy_(group_ends(T, E, k, g, device))
        for impl in impls if rep % 2 else impls[::-1]:
            n = rows[impl.name]
            x = torch.randn(n, D, device=device, dtype=dtype)
            grad = torch.randn(n, D, device=device, dtype=dtype)
            ms = fwd_bwd_time(impl, x, grad, device)
            if rep >= args.warmup:
                times[impl.name].append(ms)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "dtype": dtype_name,
        "num_experts": E,
        "top_k": k,
        "tokens": T,
        "d_model": D,
        "d_ff": F,
        "experts_ms": round(med["experts"], 3),
        "dense_ms": round(med["dense"], 3),
        "experts_pct_of_dense": round(100 * med["dense"] / med["experts"], 1),
        "compile": args.compile,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_grid_args(p)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead"])
    p.add_argument("--json", help="write the rows to this path")
    args = p.parse_args()
    print(
        f"device={args.device} torch={torch.__version__} T={args.tokens} D={args.d_model} "
        f"F={args.d_ff} compile={args.compile} (fwd+bwd, medians of {args.reps})"
    )
    print(f"{'dtype':>9} {'E':>4} {'k':>2} {'experts ms':>11} {'dense ms':>9} {'%dense':>7}")
    rows = []
    for dtype_name in args.dtypes.split(","):
        for E in map(int, args.experts.split(",")):
            for k in map(int, args.top_k.split(",")):
                r = bench(args, E, k, dtype_name)
                rows.append(r)
                print(
                    f"{dtype_name:>9} {E:>4} {k:>2} {r['experts_ms']:>11.2f} "
                    f"{r['dense_ms']:>9.2f} {r['experts_pct_of_dense']:>6.0f}%",
                    flush=True,
                )
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
