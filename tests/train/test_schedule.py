"""The learning-rate schedule: linear warmup, then cosine to the floor."""

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


def test_the_warmup_does_not_depend_on_the_run_length():
    optim = OptimSection(lr=1.0, warmup_steps=200)
    for step in (0, 9, 150):
        assert learning_rate(step, 40, optim) == learning_rate(step, 800, optim)
    assert learning_rate(39, 40, optim) == pytest.approx(40 / 200)
