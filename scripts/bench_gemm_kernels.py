"""Each grouped GEMM of the MoE layer, alone, on a GPU: PyTorch's ``grouped_mm``, our Triton
kernels and the dense ``mm`` of the same total shape, which is the rate to reach.

The layer runs six grouped GEMMs a step (SwiGLU experts, T*k rows in expert order):
``in`` [N, D] x [D, 2F] and ``out`` [N, F] x [F, D] forward, their input gradients ``in_dx``
[N, 2F] x [2F, D] and ``out_dx`` [N, D] x [D, F], and their weight gradients ``in_dw``
(``dy^T x`` per group, [2F, D] each) and ``out_dw``. Weights are stored as the layer
stores them ([E, O, I], ``nn.Linear``'s layout), so the forward reads them K-major and the
input gradient N-major. Group sizes come from a random top-k router. Ours: ``triton`` (the
``triton`` backend's forward: the persistent TMA kernel where the operands qualify, as
here), ``triton_pointer`` (the plain-load kernels) and ``triton_tma`` (the TMA weight
gradient). Each implementation is checked against ``grouped_mm`` before it is timed
(largest difference relative to the largest value). Two times per call, medians: eager
(CUDA events around each call as eager code makes it, the host's work included: the plain
forward computes its tile schedule with a dozen small PyTorch ops first) and GPU (the call
captured in a CUDA graph and replayed back to back: the kernels alone).

    python scripts/bench_gemm_kernels.py --json gemms.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from moe.kernels import count_per_expert
from moe.kernels import triton_gemm as tg
from moe.kernels import triton_tma as tma

SHAPES = {  # name: (tokens, d_model, expert d_ff, experts, top-k)
    "layer_E8_k1": (16384, 1024, 2048, 8, 1),
    "layer_E8_k2": (16384, 1024, 2048, 8, 2),
    "layer_E32_k1": (16384, 1024, 2048, 32, 1),
    "layer_E32_k2": (16384, 1024, 2048, 32, 2),
    "layer_E128_k1": (16384, 1024, 2048, 128, 1),
    "layer_E128_k2": (16384, 1024, 2048, 128, 2),
    "gpu_1b": (16384, 1024, 512, 64, 2),
}


def group_ends(T: int, E: int, k: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    ids_TK = torch.randn(T, E, generator=g).topk(k, dim=-1).indices
    return torch.cumsum(count_per_expert(ids_TK, E), 0).to(device, torch.int32)


def cuda_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gpu_ms(fn, reps: int) -> float:
    """The call's GPU time alone: captured once in a CUDA graph, replayed back to back (the
    host's launch work is gone, so this is what a compiled step with CUDA graphs pays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    batches = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        batches.append(start.elapsed_time(end) / reps)
    return statistics.median(batches)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()


def roles(T: int, D: int, F_: int, E: int, k: int, device: str):
    """(name, flops, dense call, grouped_mm call, {impl: call}) for each of the six GEMMs."""
    N, H = T * k, 2 * F_
    bf16 = dict(device=device, dtype=torch.bfloat16)
    offsets = group_ends(T, E, k, device)
    w_in = torch.randn(E, H, D, **bf16) / D**0.5  # stored [E, O, I]
    w_out = torch.randn(E, D, F_, **bf16) / F_**0.5
    for name, rows_in, w_EIO in (
        ("in", D, w_in.transpose(1, 2)),
        ("out", F_, w_out.transpose(1, 2)),
        ("in_dx", H, w_in),
        ("out_dx", D, w_out),
    ):
        x = torch.randn(N, rows_in, **bf16)
        dense_w = w_EIO[0].contiguous() if name.endswith("dx") else w_EIO[0]
        impls = {
            "triton": lambda x=x, w=w_EIO: tg.gmm(x, w, offsets),
            "triton_pointer": lambda x=x, w=w_EIO: tg.gmm_pointer(x, w, offsets),
        }
        yield (
            name,
            2 * N * rows_in * w_EIO.shape[2],
            lambda x=x, w=dense_w: x @ w,
            lambda x=x, w=w_EIO: F.grouped_mm(x, w, offs=offsets),
            impls,
        )
    for name, I, O in (("in_dw", H, D), ("out_dw", D, F_)):
        x, dy = torch.randn(N, I, **bf16), torch.randn(N, O, **bf16)
        impls = {
            "triton_pointer": lambda x=x, dy=dy: tg.gmm_wgrad_pointer(x, dy, offsets),
            "triton_tma": lambda x=x, dy=dy: tma.gmm_wgrad_tma(x, dy, offsets),
        }
        yield (
            name,
            2 * N * I * O,
            lambda x=x, dy=dy: x.t() @ dy,
            lambda x=x, dy=dy: F.grouped_mm(x.t(), dy, offs=offsets),
            impls,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gemm_kernels.py times GPU kernels; no CUDA device here")
    rows = []
    for shape in args.shapes.split(","):
        T, D, F_, E, k = SHAPES[shape]
        for name, flops, dense, grouped, impls in roles(T, D, F_, E, k, "cuda"):
            expected = grouped()
            row = {"shape": shape, "gemm": name}
            for impl, call in {"dense": dense, "grouped_mm": grouped, **impls}.items():
                try:
                    out = call()
                    if out is None:
                        raise ValueError("the operands do not qualify for this kernel")
                    if impl != "dense":
                        row[f"{impl} diff"] = rel_diff(out, expected)
                    row[f"{impl} ms"] = cuda_ms(call, args.warmup, args.reps)
                    row[f"{impl} gpu ms"] = gpu_ms(call, args.reps)
                except Exception as err:  # a kernel this GPU cannot run: say so, go on
                    row[f"{impl} error"] = f"{type(err).__name__}: {str(err)[:200]}"
                    print(f"  {impl}: {row[f'{impl} error']}", flush=True)
            row["dense TFLOP/s"] = flops / row["dense gpu ms"] / 1e9
            timed = [key[:-7] for key in row if key.endswith(" gpu ms")]
            print(
                f"{shape:14s} {name:7s} ms eager/GPU, % of dense GPU "
                f"(dense {row['dense TFLOP/s']:.0f} TFLOP/s):  "
                + "  ".join(
                    f"{impl} {row[impl + ' ms']:.3f}/{row[impl + ' gpu ms']:.3f} "
                    f"{row['dense gpu ms'] / row[impl + ' gpu ms']:.0%}"
                    for impl in timed
                ),
                flush=True,
            )
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
