"""MoE layer forward+backward against a dense FFN of equal active FLOPs and against peers.

Every implementation runs on the same inputs with the same weights, interleaved in one
loop, and the table reports medians. Each repetition draws fresh inputs, so routing (and
the per-expert row counts) change between steps as they do in training; the order of the
implementations rotates between repetitions.

- ``pct_of_dense``: dense FFN time / implementation time (throughput as % of dense; the
  dense FFN has width ``top_k * d_ff``, so active FLOPs are equal).
- ``pct_of_limit``: the limit is the larger of the dense FFN's time and the time to stream
  the expert weights three times (read in forward, read in backward, write the gradient),
  the latter measured in the same run with a copy plus a read of buffers of that size.
- ``speedup_vs_<peer>``: peer time / our time on the same configuration.
- cost growth (a second table; rows with ``impl`` "growth"): ``cost_growth.py``.

On the CPU the process keeps freed memory for reuse, as the trainer does
(``moe/train/host_memory.py``; ``--host-memory release`` measures without it).

Examples:
    python scripts/bench_moe_layer.py --quick
    python scripts/bench_moe_layer.py --json benchmarks/results/cpu.json
"""

from __future__ import annotations

import moe  # noqa: F401  first, as in moe-train: torch's allocator options (moe/__init__.py)

# isort: split
import argparse
import json
import statistics

import torch
import torch._dynamo
from bench_grid import DTYPES, add_grid_args
from bench_timing import WeightTraffic, fwd_bwd_time, weight_traffic_time
from cost_growth import bench_growth, print_growth
from moe.kernels import BACKENDS, triton_available
from moe_peers import Impl, deepspeed_moe, transformers_moe

from moe.layers import FeedForward, MoEConfig, MoELayer
from moe.train.host_memory import keep_freed_host_memory


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_grid_args(p)
    p.add_argument(
        "--backends",
        default="auto,loop,torch",
        help=f"our backends to time, from {BACKENDS} (triton: CUDA only)",
    )
    p.add_argument(
        "--peers",
        default="deepspeed,transformers",
        help="peers to time: deepspeed, transformers, transformers_grouped_mm",
    )
    p.add_argument(
        "--reps",
        type=int,
        default=9,
        help="timed repetitions per implementation (on a 2-core VM, medians of 5 moved by "
        "up to 5%% between runs)",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--budget-s",
        type=float,
        default=4.0,
        help="stop running an implementation once its runs (warmups included) pass this "
        "many seconds in one configuration (slow peers; one timed run always stays)",
    )
    p.add_argument(
        "--compile",
        choices=("none", "default", "reduce-overhead"),
        default="none",
        help="torch.compile ours and dense (fullgraph=True) in this mode; reduce-overhead adds "
        "CUDA graphs. Compile time is paid in the warm-ups",
    )
    p.add_argument(
        "--compile-peers",
        action="store_true",
        help="with --compile, compile the peers too (by default they run eager, as their "
        "users get them)",
    )
    p.add_argument(
        "--host-memory",
        choices=("keep", "release"),
        default="keep",
        help="on the CPU: keep freed memory in the process, as the trainer does, or release "
        "large blocks to the OS (glibc's default)",
    )
    p.add_argument("--quick", action="store_true", help="E in {8, 32}, k=1, 3 reps")
    p.add_argument("--json", help="write one JSON row per measurement to this path")
    args = p.parse_args()
    if args.quick:
        args.experts, args.top_k, args.reps, args.warmup, args.budget_s = "8,32", "1", 3, 1, 1.0
    return args


def our_layer(args, E: int, k: int, dtype: torch.dtype, backend: str) -> Impl:
    """Our MoE layer on ``backend``, its weights drawn from seed 0 (the same for every
    backend)."""
    torch.manual_seed(0)
    gate_mode = "switch" if k == 1 else "renormalize"  # what DeepSpeed's top-1/top-2 gates do
    cfg = MoEConfig(num_experts=E, top_k=k, d_ff=args.d_ff, gate_mode=gate_mode, backend=backend)
    layer = MoELayer(args.d_model, cfg).to(args.device, dtype)
    return Impl(f"ours_{backend}", layer, lambda x, m=layer: m(x)[0])


def build_impls(args, E: int, k: int, dtype: torch.dtype) -> tuple[list[Impl], list[str]]:
    torch.manual_seed(0)
    if args.compile != "none":
        torch._dynamo.reset()  # each configuration compiles afresh, not as a recompilation
    D, F = args.d_model, args.d_ff
    impls, skipped = [], []
    for backend in args.backends.split(","):
        if backend == "triton" and (args.device != "cuda" or not triton_available()):
            skipped.append("ours_triton: needs CUDA")
            continue
        impls.append(our_layer(args, E, k, dtype, backend))
    reference = impls[0].module if impls else None
    dense = FeedForward(D, k * F).to(args.device, dtype)
    impls.append(Impl("dense", dense, dense))
    for peer in filter(None, args.peers.split(",")):
        if peer == "deepspeed":
            made = deepspeed_moe(reference, D)
        else:
            impl_name = "grouped_mm" if peer == "transformers_grouped_mm" else "eager"
            made = transformers_moe(reference, D, impl_name)
        if isinstance(made, str):
            skipped.append(f"{peer}: {made}")
        else:
            impls.append(made)
    if args.compile != "none":
        impls = [
            compiled(impl, args.compile) if is_ours_or_dense(impl) or args.compile_peers else impl
            for impl in impls
        ]
    return impls, skipped


def is_ours_or_dense(impl: Impl) -> bool:
    return impl.name.startswith("ours_") or impl.name == "dense"


def compiled(impl: Impl, mode: str) -> Impl:
    """``impl`` with its call compiled: ours and dense as one graph, a peer as it comes."""
    run = torch.compile(impl.run, fullgraph=is_ours_or_dense(impl), mode=mode, dynamic=False)
    return Impl(impl.name, impl.module, run)


def bench_config(args, E: int, k: int, dtype_name: str) -> list[dict]:
    dtype = DTYPES[dtype_name]
    impls, skipped = build_impls(args, E, k, dtype)
    g = torch.Generator().manual_seed(1)

    def draw():
        return torch.randn(args.tokens, args.d_model, generator=g).to(args.device, dtype)

    inputs = [(draw(), draw()) for _ in range(args.warmup + args.reps)]
    x = inputs[0][0]

    ours = impls[0]
    diffs = {}
    # With grad, on an input that wants one, as in the timed runs: a compiled implementation
    # then compiles once (no separate no-grad graph).
    xg = x.detach().requires_grad_()
    y_ours = ours.run(xg).detach().float().clone()  # CUDA graphs reuse their output buffers
    for impl in list(impls):
        try:
            diffs[impl.name] = (impl.run(xg).detach().float() - y_ours).abs().max().item()
        except Exception as err:  # a peer that cannot run this dtype/device is reported
            impls.remove(impl)
            skipped.append(f"{impl.name}: {type(err).__name__}: {str(err).splitlines()[0]}")
    expert_bytes = sum(p.numel() * p.element_size() for p in ours.module.experts.parameters())

    traffic = WeightTraffic(expert_bytes, dtype, args.device)
    times: dict[str, list[float]] = {i.name: [] for i in [*impls, traffic]}
    spent = {i.name: 0.0 for i in impls}  # warmups included, for the budget of slow peers
    for rep, (x, grad) in enumerate(inputs):
        # Interleaved, so drift in machine speed hits everyone alike, and in an order that
        # rotates: our backends route identically, and on the CPU the first to meet a new
        # set of row counts pays oneDNN's kernel compilation for all of them.
        shift = rep % len(impls)
        for impl in impls[shift:] + impls[:shift]:
            timed = times[impl.name]
            over = spent[impl.name] > 1e3 * args.budget_s
            if over and (timed or rep < args.warmup):
                continue  # enough of a slow implementation (it keeps at least one sample)
            ms = fwd_bwd_time(impl, x, grad, args.device)
            spent[impl.name] += ms
            if rep >= args.warmup:
                timed.append(ms)
        ms = weight_traffic_time(traffic, args.device)
        if rep >= args.warmup:
            times["traffic"].append(ms)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    limit = max(med["dense"], med["traffic"])
    peers = [i.name for i in impls if not i.name.startswith("ours_") and i.name != "dense"]
    rows = []
    for impl in impls:
        row = {
            "impl": impl.name,
            "dtype": dtype_name,
            "num_experts": E,
            "top_k": k,
            "tokens": args.tokens,
            "d_model": args.d_model,
            "d_ff": args.d_ff,
            "ms": round(med[impl.name], 3),
            "samples": len(times[impl.name]),
            "pct_of_dense": round(100 * med["dense"] / med[impl.name], 1),
            "pct_of_limit": round(100 * limit / med[impl.name], 1),
            "limit_ms": round(limit, 3),
            "traffic_ms": round(med["traffic"], 3),
            "max_abs_diff_vs_ours": diffs[impl.name],
            "compile": args.compile,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        }
        if impl.name.startswith("ours_"):
            for peer in peers:
                row[f"speedup_vs_{peer}"] = round(med[peer] / med[impl.name], 2)
        rows.append(row)
    for reason in skipped:
        print(f"  skipped {reason}")
    return rows


def grown(args, k: int, dtype_name: str):
    """E -> our layer on the first backend (compiled as the grid's), for the cost growth."""
    backend = args.backends.split(",")[0]

    def make(E: int) -> Impl:
        impl = our_layer(args, E, k, DTYPES[dtype_name], backend)
        return compiled(impl, args.compile) if args.compile != "none" else impl

    return make


def print_table(rows: list[dict]) -> None:
    peers = sorted({key for r in rows for key in r if key.startswith("speedup_vs_")})
    head = ["dtype", "E", "k", "impl", "ms", "%dense", "%limit", "maxdiff"] + [
        p.replace("speedup_vs_", "x_") for p in peers
    ]
    print(" | ".join(f"{h:>12}" for h in head))
    for r in rows:
        cells = [
            r["dtype"],
            r["num_experts"],
            r["top_k"],
            r["impl"],
            f"{r['ms']:.1f}",
            f"{r['pct_of_dense']:.0f}%",
            f"{r['pct_of_limit']:.0f}%",
            f"{r['max_abs_diff_vs_ours']:.1e}",
        ]
        cells += [f"{r[p]:.2f}" if p in r else "" for p in peers]
        print(" | ".join(f"{c!s:>12}" for c in cells))


def main() -> None:
    args = parse_args()
    kept = args.device == "cpu" and args.host_memory == "keep" and keep_freed_host_memory()
    print(
        f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"T={args.tokens} D={args.d_model} F={args.d_ff} compile={args.compile} "
        f"host_memory={'keep' if kept else 'release'} "
        f"(fwd+bwd, medians of up to {args.reps})"
    )
    configs = [
        (dtype_name, E, k)
        for dtype_name in args.dtypes.split(",")
        for E in map(int, args.experts.split(","))
        for k in map(int, args.top_k.split(","))
    ]
    # A process's first configuration ran slow for every implementation alike (on the CPU,
    # bfloat16 first: ours, the dense FFN and DeepSpeed at 1.4x their times later in the same
    # process), more than the per-configuration warm-up absorbs: it runs once untimed.
    dtype_name, E, k = configs[0]
    print(f"warm-up: {dtype_name} E={E} k={k} (not reported) ...", flush=True)
    bench_config(args, E, k, dtype_name)
    rows = []

    def save():  # after every measurement, so a run cut short keeps its rows
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)

    for dtype_name, E, k in configs:
        print(f"{dtype_name} E={E} k={k} ...", flush=True)
        rows += bench_config(args, E, k, dtype_name)
        save()
    print_table(rows)
    experts = sorted({E for _, E, _ in configs})
    if len(experts) >= 2:
        growth = []
        for dtype_name in args.dtypes.split(","):
            for k in map(int, args.top_k.split(",")):
                print(f"growth {dtype_name} k={k} E={experts[0]} vs {experts[-1]} ...", flush=True)
                growth.append(
                    bench_growth(args, k, dtype_name, experts, grown(args, k, dtype_name))
                )
                rows.append(growth[-1])
                save()
        print_growth(growth)


if __name__ == "__main__":
    main()
