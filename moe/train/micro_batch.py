"""How many sequences each rank runs per forward (``train.micro_batch_size``).

The global batch of an optimizer step is fixed by ``train.global_batch_size``; each rank
gets an equal share of it and runs that share in micro-batches (gradient accumulation). The
micro-batch is a memory/speed choice only: the sequences of every step are the same, so
with global load balancing the losses do not depend on it either.

``auto`` takes the largest micro-batch that divides the rank's share and fits:
- on the CPU, and on GPUs with several processes, a preset token budget per micro-batch
  (an out-of-memory error on one rank in the middle of an all-to-all would hang the others,
  so there is no trial run with several processes);
- on one GPU, found by trying forward and backward and halving on out-of-memory before the
  first step, as Lightning's batch-size finder and accelerate's
  ``find_executable_batch_size`` do.
"""

from __future__ import annotations

from collections.abc import Callable

from .config import ConfigError

# Tokens per micro-batch where no trial run decides: 32 sequences of 128 on a CPU keep the
# activations of the presets within a few GiB; GPUs hold more.
CPU_TOKEN_BUDGET = 4096
GPU_TOKEN_BUDGET = 16384


def rank_share(global_batch: int, processes: int) -> int:
    """Sequences of each global batch that one rank runs."""
    if global_batch % processes:
        raise ConfigError(
            f"train.global_batch_size ({global_batch}) must be a multiple of the number of "
            f"processes ({processes}); set train.global_batch_size={global_batch * processes}"
        )
    return global_batch // processes


def resolve_micro_batch(
    requested: int | str,
    global_batch: int,
    processes: int,
    seq_len: int,
    token_budget: int = CPU_TOKEN_BUDGET,
    fits: Callable[[int], bool] | None = None,
) -> int:
    """The micro-batch per rank. ``requested``: an int (checked) or ``"auto"``.
    ``fits(n)``: whether ``n`` sequences fit (a trial run); without it, ``token_budget``."""
    share = rank_share(global_batch, processes)
    if requested != "auto":
        if share % requested:
            raise ConfigError(
                f"train.global_batch_size ({global_batch}) must be a multiple of "
                f"train.micro_batch_size ({requested}) x processes ({processes}); "
                f"or set train.micro_batch_size=auto"
            )
        return requested
    candidates = [n for n in range(share, 0, -1) if share % n == 0]
    if fits is None:
        return next(n for n in candidates if n * seq_len <= token_budget or n == 1)
    for n in candidates:
        if fits(n):
            return n
    raise ConfigError(
        f"train.micro_batch_size=auto: one sequence of train.seq_len={seq_len} does not fit "
        "in device memory; lower train.seq_len or use train.checkpointing=full"
    )
