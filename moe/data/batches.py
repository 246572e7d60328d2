"""Token streams packed into fixed-length sequences, served in a seeded order.

Shape legend: B sequences, S ``seq_len``.

Sequence ``i`` of a stream is tokens ``[i*S, i*S + S]`` (S+1 tokens: inputs and shifted
targets). The training order is a fresh seeded permutation per epoch, and the sampler's
whole state is one integer, the number of sequences served so far. The sequences of a
global batch depend only on that position, never on the world size, so one process and N
processes see the same data at every step; each rank takes its slice.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from moe.typed_config import ConfigError

IGNORE = -100  # a target the loss skips (F.cross_entropy's default ignore_index)


class PackedSequences:
    """``trained``: per token of ``stream``, whether the model learns to predict it (chat
    data: the assistant replies); None: every token. A target that is not trained is
    ``IGNORE``."""

    def __init__(
        self, stream: np.ndarray, seq_len: int, name: str, trained: np.ndarray | None = None
    ):
        count = (len(stream) - 1) // seq_len
        if count < 1:
            raise ConfigError(
                f"the {name} split has {len(stream)} tokens, fewer than one sequence of "
                f"train.seq_len={seq_len}; add data or lower train.seq_len"
            )
        self.stream = torch.from_numpy(stream[: count * seq_len + 1].astype(np.int64))
        self.trained = None
        if trained is not None:
            self.trained = torch.from_numpy(trained[: count * seq_len + 1].astype(bool))
        self.seq_len = seq_len
        self.count = count

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs and targets [B, S] for the given sequence indices."""
        starts = indices.unsqueeze(1) * self.seq_len
        positions = starts + torch.arange(self.seq_len + 1)
        window = self.stream[positions]
        targets = window[:, 1:]
        if self.trained is not None:
            targets = targets.masked_fill(~self.trained[positions[:, 1:]], IGNORE)
        return window[:, :-1], targets

    def describe_trained(self) -> str:
        """How many of the split's tokens the loss trains on (chat data), for the start line."""
        total = len(self.stream)
        replies = total if self.trained is None else int(self.trained.sum())
        return (
            f"{replies:,} of {total:,} training tokens are assistant replies "
            f"({replies / total:.1%}), the only ones trained"
        )

    def trained_targets(self, indices: Tensor) -> int:
        """How many targets of these sequences the loss counts."""
        if self.trained is None:
            return len(indices) * self.seq_len
        starts = indices.unsqueeze(1) * self.seq_len
        return int(self.trained[starts + torch.arange(1, self.seq_len + 1)].sum())


class Sampler:
    """Seeded epoch permutations over ``count`` sequences, addressed by a global position."""

    def __init__(self, count: int, seed: int):
        self.count, self.seed = count, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.count, generator=g)
        return self._perm

    def indices(self, position: int, n: int) -> Tensor:
        """Sequence indices for positions ``position .. position + n - 1``."""
        out = []
        for pos in range(position, position + n):
            out.append(self._permutation(pos // self.count)[pos % self.count])
        return torch.stack(out)
