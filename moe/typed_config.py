"""Typed configuration: dataclasses built from nested dicts (what Hydra composes), each
key and scalar type checked, each dataclass validating itself in ``__post_init__``.

``ConfigError`` is the one exception for a configuration mistake; its message is one line
that names the key and says what to change (the command line prints it and exits 2).
"""

from __future__ import annotations

import dataclasses
from typing import Any, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A configuration mistake; its message is one line that says what to change."""


def from_dict(cls: type, values: Any, prefix: str = "") -> Any:
    """Dataclass ``cls`` from nested dicts; unknown keys and wrong scalar types are refused
    with the key's full name (``prefix`` + field)."""
    return _build(cls, values, prefix)


def _build(cls: type, values: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from nested dicts, checking keys and scalar types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; known keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key + ".")
        elif get_origin(hint) is list:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{key} must be a list, got {value!r}")
            (item,) = get_args(hint)
            kwargs[name] = [_check_scalar(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        else:
            kwargs[name] = _check_scalar(value, hint, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # the layer's and model's own checks name the bare field
        raise ConfigError(f"{prefix}{err}") from None


def declared_defaults(cls: type) -> dict[str, Any]:
    """Every key of dataclass ``cls`` with its declared default (nested dataclasses as dicts;
    a default that ``__post_init__`` derives stays as declared, e.g. None)."""
    hints = get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = declared_defaults(hints[f.name])
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = f.default
    return out


def _check_scalar(value: Any, hint: Any, key: str) -> Any:
    allowed = getattr(hint, "__args__", (hint,))
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{key} must not be null")
    if isinstance(value, bool):  # a bool is an int to Python, never to a config key
        if bool in allowed:
            return value
    elif int in allowed and isinstance(value, int):
        return value
    elif float in allowed and isinstance(value, (int, float)):
        return float(value)
    elif str in allowed and isinstance(value, str):
        return value
    wanted = " or ".join(t.__name__ for t in allowed if t is not type(None))
    raise ConfigError(f"{key} must be {wanted}, got {value!r}")
