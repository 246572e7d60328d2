"""Where the MoE layer's time goes on a CPU with our `avx512` kernels, by wall clock: each
call into our CPU module (the grouped GEMMs, SwiGLU, the dispatch rows, the router) timed
inside the layer's forward+backward, medians over steps, next to the whole layer and the
dense FFN of equal active FLOPs. The torch profiler's self times for our autograd functions
disagreed with wall clock by 3x and more on these VMs (SwiGLU's backward: 16.7 ms a step
under the profiler, 1.7-3.8 ms by wall clock); this counts only time spent in our calls.

    python scripts/cpu_op_times.py --experts 8,32,128 --top-k 1 --dtype bfloat16
"""

from __future__ import annotations

import moe  # noqa: F401  first, as in moe-train: torch's allocator options (moe/__init__.py)

# isort: split
import argparse
import collections
import statistics
import time

import torch
from moe.kernels import cpu_gemm

from moe.layers import FeedForward, MoEConfig, MoELayer
from moe.train.host_memory import keep_freed_host_memory


def call_label(name: str, args) -> str:
    """``name`` and the shapes of its matrix operands, e.g. ``gmm_x_w 4096x256 1x256x512``:
    the router's GEMMs (one group) apart from the experts' and the two projections apart."""
    shapes = [
        "x".join(map(str, a.shape)) for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2
    ]
    return " ".join([name, *shapes])


class TimedModule:
    """Our compiled module with every call's wall-clock seconds added to ``spent[label]``
    (``call_label``)."""

    def __init__(self, module):
        self.module = module
        self.spent: dict[str, float] = collections.defaultdict(float)

    def __getattr__(self, name: str):
        attr = getattr(self.module, name)
        if not callable(attr):
            return attr

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.spent[call_label(name, args)] += time.perf_counter() - start

        return timed


def fwd_bwd_ms(run, x: torch.Tensor, grad: torch.Tensor, params) -> float:
    for p in params:
        p.grad = None
    start = time.perf_counter()
    run(x.detach().requires_grad_()).backward(grad)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--experts", default="8,32,128", help="comma-separated expert counts")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    if not cpu_gemm.avx512_available():
        raise SystemExit("cpu_op_times.py times our avx512 module: this CPU or toolchain lacks it")

    keep_freed_host_memory()  # as the trainer does: no page faults for new gradients
    timed = TimedModule(cpu_gemm.module())
    cpu_gemm.module = lambda: timed  # every caller looks the module up at call time
    dtype = getattr(torch, args.dtype)
    T, D, F, k = args.tokens, args.d_model, args.d_ff, args.top_k
    print(f"threads={torch.get_num_threads()} T={T} D={D} F={F} k={k} {args.dtype} (ms, medians)")
    for E in (int(e) for e in args.experts.split(",")):
        torch.manual_seed(0)
        layer = MoELayer(D, MoEConfig(num_experts=E, top_k=k, d_ff=F)).to(dtype)
        dense = FeedForward(D, k * F).to(dtype)

        def run_layer(x, layer=layer):
            return layer(x)[0]

        per_op: dict[str, list[float]] = collections.defaultdict(list)
        totals: dict[str, list[float]] = collections.defaultdict(list)
        for step in range(args.warmup + args.steps):
            x, grad = torch.randn(T, D).to(dtype), torch.randn(T, D).to(dtype)
            timed.spent.clear()
            layer_ms = fwd_bwd_ms(run_layer, x, grad, layer.parameters())
            spent = dict(timed.spent)
            dense_ms = fwd_bwd_ms(dense, x, grad, dense.parameters())
            if step >= args.warmup:
                totals["layer"].append(layer_ms)
                totals["dense"].append(dense_ms)
                for name, seconds in spent.items():
                    per_op[name].append(seconds * 1e3)
        med = {name: statistics.median(v) for name, v in per_op.items()}
        layer_ms, dense_ms = (statistics.median(totals[n]) for n in ("layer", "dense"))
        print(
            f"E={E}: layer {layer_ms:.1f}, dense FFN {dense_ms:.1f} ({dense_ms / layer_ms:.0%} of "
            f"dense speed); in our calls {sum(med.values()):.1f}, elsewhere "
            f"{layer_ms - sum(med.values()):.1f}"
        )
        for name, ms in sorted(med.items(), key=lambda kv: -kv[1]):
            print(f"    {name:48s} {ms:7.2f}")


if __name__ == "__main__":
    main()
