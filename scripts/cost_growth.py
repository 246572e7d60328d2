"""The layer benchmark's cost growth: our layer at the smallest and the largest expert count
of the grid, timed interleaved in one loop on the same inputs, per dtype and k.

The grid's configurations run minutes apart, and a VM's speed drifts by 5-10% over minutes;
interleaved, the drift hits both alike.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from bench_grid import DTYPES
from bench_timing import fwd_bwd_time
from moe_peers import Impl


def bench_growth(
    args, k: int, dtype_name: str, experts: list[int], make: Callable[[int], Impl]
) -> dict:
    """``make(E)``: our layer at E experts (k, dtype and backend fixed by the caller). The
    time at the largest E over the time at the smallest, the order alternating."""
    dtype = DTYPES[dtype_name]
    small, large = min(experts), max(experts)
    impls = [make(small), make(large)]
    g = torch.Generator().manual_seed(2)
    times: list[list[float]] = [[], []]
    for rep in range(args.warmup + args.reps):
        x, grad = (torch.randn(args.tokens, args.d_model, generator=g) for _ in range(2))
        x, grad = x.to(args.device, dtype), grad.to(args.device, dtype)
        order = (0, 1) if rep % 2 == 0 else (1, 0)
        for i in order:
            ms = fwd_bwd_time(impls[i], x, grad, args.device)
            if rep >= args.warmup:
                times[i].append(ms)
    base_ms, ms = (statistics.median(t) for t in times)
    return {
        "impl": "growth",
        "backend": impls[0].name.removeprefix("ours_"),
        "dtype": dtype_name,
        "num_experts": large,
        "base_experts": small,
        "top_k": k,
        "tokens": args.tokens,
        "d_model": args.d_model,
        "d_ff": args.d_ff,
        "ms": round(ms, 3),
        "base_ms": round(base_ms, 3),
        "growth": round(ms / base_ms, 3),
        "samples": args.reps,
        "compile": args.compile,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
    }


def print_growth(rows: list[dict]) -> None:
    print("cost growth, interleaved in one loop (time at the largest E over the smallest):")
    print(" | ".join(f"{h:>12}" for h in ["dtype", "k", "backend", "E", "ms", "ms_base", "growth"]))
    for r in rows:
        cells = [
            r["dtype"],
            r["top_k"],
            r["backend"],
            f"{r['base_experts']}->{r['num_experts']}",
            f"{r['ms']:.1f}",
            f"{r['base_ms']:.1f}",
            f"{r['growth']:.3f}",
        ]
        print(" | ".join(f"{c!s:>12}" for c in cells))
