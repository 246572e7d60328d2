"""moe-train: Mixture-of-Experts training."""

__version__ = "0.1.0"


def load_model(checkpoint, device="cpu"):
    """The model of a checkpoint (or a run directory's newest one), in eval mode."""
    from moe.checkpoint import load_model as _load_model

    return _load_model(checkpoint, device)


__all__ = ["load_model"]
