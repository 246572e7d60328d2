"""train.micro_batch_size=auto: the largest micro-batch that divides the rank's share and
fits; explicit values are checked as before."""

import pytest

from moe.train.micro_batch import CPU_TOKEN_BUDGET, resolve_micro_batch
from moe.typed_config import ConfigError


@pytest.mark.parametrize(
    "global_batch, processes, seq_len, expected",
    [
        (16, 1, 128, 16),  # the default: one micro-batch per step
        (16, 2, 128, 8),  # README's two processes: 8 each, no accumulation
        (16, 4, 128, 4),
        (64, 1, 128, CPU_TOKEN_BUDGET // 128),  # capped by the token budget
        (48, 1, 1000, 4),  # 4 x 1000 tokens fit, 6 would not; 4 divides 48
        (7, 1, 4096, 1),  # one sequence over the budget still runs
    ],
)
def test_auto_takes_the_largest_divisor_within_the_budget(
    global_batch, processes, seq_len, expected
):
    assert resolve_micro_batch("auto", global_batch, processes, seq_len) == expected


def test_auto_with_a_trial_run_halves_until_it_fits():
    tried = []

    def fits(n):
        tried.append(n)
        return n <= 5

    assert resolve_micro_batch("auto", 24, 1, 128, fits=fits) == 4
    assert tried == [24, 12, 8, 6, 4]  # divisors of 24, largest first
    with pytest.raises(ConfigError, match="does not fit"):
        resolve_micro_batch("auto", 24, 1, 128, fits=lambda n: False)


def test_explicit_values_are_checked():
    assert resolve_micro_batch(4, 16, 2, 128) == 4
    with pytest.raises(ConfigError, match=r"multiple of train.micro_batch_size \(3\)"):
        resolve_micro_batch(3, 16, 2, 128)
    with pytest.raises(ConfigError, match=r"multiple of the number of processes \(3\)"):
        resolve_micro_batch("auto", 16, 3, 128)
