"""How the layer benchmarks time one measurement: a forward+backward with fresh gradients,
and the memory limit (the expert weights' bytes read twice and written once)."""

from __future__ import annotations

import time

import torch
from moe_peers import Impl


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fwd_bwd_time(impl: Impl, x: torch.Tensor, grad: torch.Tensor, device: str) -> float:
    """Milliseconds of one forward+backward, gradients freshly allocated as in training."""
    for p in impl.module.parameters():
        p.grad = None
    xi = x.detach().requires_grad_()
    torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA graphs (reduce-overhead)
    sync(device)
    start = time.perf_counter()
    impl.run(xi).backward(grad)
    sync(device)
    return (time.perf_counter() - start) * 1e3


class WeightTraffic(Impl):
    """Stands for the memory limit: read, read again and write the expert weights' bytes."""

    def __init__(self, num_bytes: int, dtype: torch.dtype, device: str):
        n = num_bytes // torch.tensor([], dtype=dtype).element_size()
        self.src = torch.randn(n, device=device).to(dtype)
        self.dst = torch.zeros_like(self.src)  # touched now, so no page faults when timed
        super().__init__("traffic", torch.nn.Module(), None)


def weight_traffic_time(traffic: WeightTraffic, device: str) -> float:
    """Milliseconds of a copy (one read, one write) plus a sum (one more read)."""
    src, dst = traffic.src, traffic.dst
    sync(device)
    start = time.perf_counter()
    dst.copy_(src)
    src.sum()
    sync(device)
    return (time.perf_counter() - start) * 1e3
