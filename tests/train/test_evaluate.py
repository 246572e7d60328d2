"""Validation covers the whole split: its sequences are spread evenly, not the first ones."""

from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from moe.data import PackedSequences
from moe.train.config import RunConfig
from moe.train.evaluate import evaluate, spread_evenly


def test_spread_evenly_covers_the_split_once():
    chosen = spread_evenly(128, 3150)
    assert len(set(chosen.tolist())) == 128
    assert chosen[0] == 0 and chosen[-1] >= 3100  # the last one within the final 2%
    assert torch.all(chosen.diff() > 0)


def test_more_sequences_than_the_split_wraps_around():
    assert spread_evenly(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]


class RecordingModel(nn.Module):
    """Uniform logits (every target costs log(vocab)); records the first token of every
    sequence it is given, which here names the sequence."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.seen: list[int] = []

    def forward(self, inputs, expert_loads=None):
        self.seen.extend(inputs[:, 0].tolist())
        return SimpleNamespace(logits=torch.zeros(*inputs.shape, self.vocab))


def test_evaluate_reads_sequences_from_the_whole_split():
    seq_len, count = 4, 100
    stream = np.repeat(np.arange(count), seq_len)  # sequence i starts with token i
    stream = np.append(stream, 0) % 256
    val = PackedSequences(stream, seq_len, "validation")
    cfg = RunConfig.from_dict(
        {
            "train": {"micro_batch_size": 2, "global_batch_size": 2, "seq_len": seq_len},
            "eval": {"batches": 5},
        }
    )
    model = RecordingModel(256)
    loss = evaluate(model, val, cfg, torch.device("cpu"))
    assert model.seen == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert abs(loss - np.log(256)) < 1e-5
