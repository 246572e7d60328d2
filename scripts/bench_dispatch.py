"""Expert-parallel dispatch: communication volume and time per MoE layer against the
number of ranks, measured side by side in one run.

For each rank count N (processes on this machine, gloo on CPU, NCCL on GPUs), each rank
holds ``--tokens`` tokens (weak scaling: a rank keeps its micro-batch as EP grows) and E/N
experts, and runs one MoE layer forward+backward with the all-to-all dispatcher. Reported,
per rank and layer, medians over ``--reps``:

- ``sent_MB``: bytes this rank sends to other ranks in the four all-to-alls of a layer
  step (dispatch and combine, forward and backward); rows kept on the rank are not sent.
- ``model_MB``: the same from the formula ``4 * T * k * D * bytes * (N-1)/N`` (uniform
  routing), to check the measurement and the cost model use the same arithmetic.
- ``layer_ms``: the layer's forward+backward; ``comm_ms``: the count exchange and the four
  all-to-alls of that step replayed alone with its split sizes; ``comm_share``.
- ``GB/s``: sent bytes / comm time.

On a 2-core CPU, 4 processes share 2 cores: the times show the method and the volumes,
not a cluster's bandwidth (see ``docs/expert_parallel_cost_model.md`` for that).

    python scripts/bench_dispatch.py --ranks 1,2,4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe.layers import MoEConfig, MoELayer
from moe.parallel import ParallelLayout, parallelize_experts
from moe.parallel.world import free_port

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ranks", default="1,2,4", help="comma-separated process counts (EP=N)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", help="also write the rows to this file")
    return p.parse_args()


def timed(fn, device):
    """(milliseconds, result) of ``fn()``, started together on every rank."""
    if dist.is_initialized():
        dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3, result


def replay_exchanges(handle, d_model, dtype, device, group, ep) -> None:
    """The communication of one layer step alone: counts, then dispatch and combine in
    forward, and the same two with the splits swapped in backward."""
    counts = torch.zeros(ep, dtype=torch.long, device=device)
    dist.all_to_all_single(torch.empty_like(counts), counts, group=group)
    sent, received = handle.send_splits, handle.recv_splits
    for out_splits, in_splits in [(received, sent), (sent, received)] * 2:
        x = torch.empty(sum(in_splits), d_model, dtype=dtype, device=device)
        out = x.new_empty(sum(out_splits), d_model)
        dist.all_to_all_single(out, x, out_splits, in_splits, group=group)


def worker(rank: int, world: int, port: int, args, queue) -> None:
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dtype = DTYPES[args.dtype]
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k, d_ff=args.d_ff)
    layer = MoELayer(args.d_model, cfg).to(device=device, dtype=dtype)
    if world > 1:
        layout = ParallelLayout.create(world)
        parallelize_experts(layer, layout)
    element = torch.finfo(dtype).bits // 8
    rows = {"layer_ms": [], "comm_ms": [], "sent_MB": []}
    g = torch.Generator(device=device).manual_seed(100 + rank)
    for rep in range(args.warmup + args.reps):
        x = torch.randn(args.tokens, args.d_model, device=device, dtype=dtype, generator=g)
        x.requires_grad_(True)

        def step(x=x):
            # MoELayer.forward spelled out, to keep the dispatch handle (its split sizes).
            route = layer.router(x)
            x_ND, offsets_E, handle = layer.dispatcher.dispatch(x, route.ids_TK, route.gates_TK)
            y_ND = layer.experts(x_ND, offsets_E)
            y = layer.dispatcher.combine(y_ND, route.gates_TK, handle)
            y.backward(torch.ones_like(y))
            return handle

        layer_ms, handle = timed(step, device)
        if world > 1:
            comm_ms, _ = timed(
                lambda h=handle: replay_exchanges(
                    h, args.d_model, dtype, device, layout.ep_group, world
                ),
                device,
            )
            off_rank = sum(handle.send_splits) - handle.send_splits[rank]
            sent = 4 * off_rank * args.d_model * element / 1e6
        else:
            comm_ms, sent = 0.0, 0.0
        if rep >= args.warmup:
            rows["layer_ms"].append(layer_ms)
            rows["comm_ms"].append(comm_ms)
            rows["sent_MB"].append(sent)
    summary = {k: statistics.median(v) for k, v in rows.items()}
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, summary)
        dist.destroy_process_group()
    else:
        gathered = [summary]
    if rank == 0:
        queue.put({k: statistics.mean(s[k] for s in gathered) for k in summary})


def main() -> None:
    args = parse_args()
    element = torch.finfo(DTYPES[args.dtype]).bits // 8
    print(
        f"# tokens/rank={args.tokens} d={args.d_model} f={args.d_ff} E={args.experts} "
        f"k={args.top_k} {args.dtype}; per rank and MoE layer, fwd+bwd, medians of "
        f"{args.reps}; {os.cpu_count()} CPU cores, "
        f"{'CUDA' if torch.cuda.is_available() else 'gloo on CPU'}"
    )
    header = ["ranks", "sent_MB", "model_MB", "comm_ms", "layer_ms", "comm_share", "GB/s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    results = []
    ctx = mp.get_context("spawn")
    for world in [int(n) for n in args.ranks.split(",")]:
        if args.experts % world:
            raise SystemExit(f"--experts={args.experts} must be divisible by each of --ranks")
        queue = ctx.SimpleQueue()
        mp.start_processes(
            worker, args=(world, free_port(), args, queue), nprocs=world, start_method="spawn"
        )
        row = queue.get()
        model_mb = 4 * args.tokens * args.top_k * args.d_model * element * (world - 1) / world
        row.update(ranks=world, model_MB=model_mb / 1e6)
        row["comm_share"] = row["comm_ms"] / row["layer_ms"]
        row["GB/s"] = row["sent_MB"] / 1e3 / (row["comm_ms"] / 1e3) if row["comm_ms"] else 0.0
        results.append(row)
        print(
            f"| {world} | {row['sent_MB']:.2f} | {row['model_MB']:.2f} | {row['comm_ms']:.2f} "
            f"| {row['layer_ms']:.2f} | {row['comm_share']:.0%} | {row['GB/s']:.2f} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
