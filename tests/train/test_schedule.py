"""The learning-rate schedule: linear warmup (at most a quarter of the run), then cosine."""

import math

import pytest

from moe.train.config import OptimSection
from moe.train.optim import learning_rate


def test_warmup_then_cosine_to_the_floor():
    optim = OptimSection(lr=1.0, warmup_steps=200, min_lr_ratio=0.1)
    assert learning_rate(0, 800, optim) == pytest.approx(1 / 200)
    assert learning_rate(199, 800, optim) == pytest.approx(1.0)
    middle = 200 + 300  # half-way through the decay
    assert learning_rate(middle, 800, optim) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(800, 800, optim) == pytest.approx(0.1)
    assert learning_rate(650, 800, optim) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 450 / 600))
    )


def test_short_runs_warm_up_over_a_quarter_of_their_steps():
    optim = OptimSection(lr=1.0, warmup_steps=200)
    assert learning_rate(9, 40, optim) == pytest.approx(1.0)  # peak after 10 of 40 steps
    assert learning_rate(4, 40, optim) == pytest.approx(0.5)
    assert learning_rate(0, 3, optim) == pytest.approx(1.0)  # no warmup under 4 steps
