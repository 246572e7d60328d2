"""How many sequences each rank runs per forward (``train.micro_batch_size``).

The global batch of an optimizer step is fixed by ``train.global_batch_size``; each rank
gets an equal share of it and runs that share in micro-batches (gradient accumulation). The
micro-batch is a memory/speed choice only: the sequences of every step are the same, so
with global load balancing the losses do not depend on it either.

``auto`` takes the largest micro-batch that divides the rank's share and fits:
- on the CPU, and on GPUs with several processes, a preset token budget per micro-batch
  (an out-of-memory error on one rank in the middle of an all-to-all would hang the others,
  so there is no trial run with several processes);
- on one GPU, found by trying forward and backward before the first step and stepping
  down on out-of-memory (through the divisors of the share, so accumulation stays exact),
  as Lightning's batch-size finder and accelerate's ``find_executable_batch_size`` do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe.typed_config import ConfigError

from .config import TrainSection

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


def choose_micro_batch(
    train: TrainSection, processes: int, device: torch.device, trial: Callable[[int], None]
) -> int:
    """``train.micro_batch_size`` for this run. ``trial(n)``: a forward and backward of
    ``n`` sequences, run (on one GPU only) until one does not run out of memory."""
    args = (train.micro_batch_size, train.global_batch_size, processes, train.seq_len)
    if device.type != "cuda":
        return resolve_micro_batch(*args)
    if processes > 1:
        return resolve_micro_batch(*args, GPU_TOKEN_BUDGET)

    def fits(n: int) -> bool:
        try:
            with torch.random.fork_rng(devices=[device]):  # the run's random state untouched
                trial(n)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    return resolve_micro_batch(*args, fits=fits)
