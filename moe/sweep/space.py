"""The search space of an Optuna sweep: config keys mapped to Hydra's sweep syntax.

``optim.lr: tag(log, interval(1e-4, 3e-2))`` is a log-uniform float, ``int(interval(1, 8))``
an integer range, ``range(2, 10, 2)`` a stepped integer range, ``choice(8, 16, 32)`` (or
``8,16,32``) a categorical choice; a plain value fixes the key. Hydra's own override parser
reads them, so the syntax is the one ``moe-train -m`` grids use.
"""

from __future__ import annotations

from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from moe.typed_config import ConfigError


def distribution(key: str, spec: Any) -> BaseDistribution:
    """The Optuna distribution that ``spec`` (a sweep expression or a plain value) names."""
    try:
        override = OverridesParser.create().parse_overrides([f"{key}={spec}"])[0]
    except Exception as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"optuna.params.{key}: cannot parse {spec!r} ({first})") from None
    value = override.value()
    if isinstance(value, IntervalSweep):
        return _interval(key, value)
    if isinstance(value, RangeSweep):
        return _range(key, value)
    if isinstance(value, ChoiceSweep):
        if not value.list:
            raise ConfigError(f"optuna.params.{key}: choice() needs at least one value")
        return CategoricalDistribution(value.list)
    return CategoricalDistribution([value])  # a fixed value: one choice


def _interval(key: str, value: IntervalSweep) -> BaseDistribution:
    low, high, log = value.start, value.end, "log" in value.tags
    if not low < high:
        raise ConfigError(
            f"optuna.params.{key}: interval({low}, {high}) is empty or inverted; "
            "write interval(low, high) with low < high"
        )
    if log and low <= 0:
        raise ConfigError(f"optuna.params.{key}: a log interval needs low > 0, got {low}")
    if isinstance(low, int) and isinstance(high, int):
        return IntDistribution(low, high, log=log)
    return FloatDistribution(float(low), float(high), log=log)


def _range(key: str, value: RangeSweep) -> BaseDistribution:
    start, stop, step = value.start, value.stop, value.step
    if not all(isinstance(v, int) for v in (start, stop, step)) or step <= 0 or start >= stop:
        raise ConfigError(
            f"optuna.params.{key}: range({start}, {stop}, {step}) must count up in integer "
            "steps; write range(low, high[, step]) with low < high"
        )
    last = start + (stop - 1 - start) // step * step  # range() excludes its stop
    return IntDistribution(start, last, step=step)


def search_space(params: dict[str, Any]) -> dict[str, BaseDistribution]:
    if not params:
        raise ConfigError("optuna.params is empty; name at least one config key to search")
    return {key: distribution(key, spec) for key, spec in params.items()}


def override_value(value: Any) -> str:
    """A sampled value as a command-line override (floats in full precision)."""
    return repr(value) if isinstance(value, float) else str(value)


def trial_overrides(params: dict[str, Any]) -> list[str]:
    """A trial's sampled values as ``key=value`` overrides, in the space's order."""
    return [f"{key}={override_value(value)}" for key, value in params.items()]
