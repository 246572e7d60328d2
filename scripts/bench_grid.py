"""The grid of configurations the layer benchmarks share (``bench_moe_layer.py``,
``bench_expert_gemms.py``): the layer's shape, expert counts, k values, dtypes, device."""

from __future__ import annotations

import argparse

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_grid_args(p: argparse.ArgumentParser) -> None:
    """The layer's shape and the grid of configurations (shared with bench_expert_gemms.py)."""
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=1024, help="hidden width of each expert")
    p.add_argument("--experts", default="8,32,128", help="comma-separated expert counts")
    p.add_argument("--top-k", default="1,2", help="comma-separated k values")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
