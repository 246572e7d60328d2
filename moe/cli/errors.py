"""The one error path of every command: ``<program>: error: <one line>`` on stderr, exit 2
(bad input) unless a code says otherwise; and the ``key=value`` argument parsing that the
non-Hydra commands share."""

from __future__ import annotations

import sys
from typing import NoReturn

from omegaconf import OmegaConf

EXIT_BAD_INPUT = 2


def fail(program: str, message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(code)


def key_values(argv: list[str], program: str) -> dict:
    """``key=value`` arguments (dotted keys nest) as a dict; anything else fails."""
    if bare := [arg for arg in argv if "=" not in arg]:
        fail(program, f"arguments are key=value, e.g. checkpoint=PATH; got {bare[0]!r}")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(argv))
    except Exception as err:
        fail(program, f"arguments are key=value, e.g. checkpoint=PATH ({err})")
