"""moe-train: Mixture-of-Experts training."""

import os

__version__ = "0.1.0"

# Large CPU tensors on transparent huge pages: the first touch of a fresh 540 MB expert
# weight gradient (E=128) costs 30 ms on 2 MB pages instead of 150 ms of 4 KB page faults
# (2-core EPYC). PyTorch's allocator reads this once, at its first allocation, so it counts
# where moe is imported before torch allocates (our entry points); set it to 0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def load_model(checkpoint, device="cpu"):
    """The model of a checkpoint (or a run directory's newest one), in eval mode."""
    from moe.checkpoint import load_model as _load_model

    return _load_model(checkpoint, device)


__all__ = ["load_model"]
