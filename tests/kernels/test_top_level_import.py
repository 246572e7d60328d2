"""The ``kernels/`` folder imported under its own name, as happens when the repository
root is on sys.path (pytest, ``python -m`` in a checkout) and transformers imports the Hub's
``kernels`` package (a requirement of transformers since 5.25): the name must reach the
Hub's package where it is installed, and never a second copy of ours, which would define our
custom ops again (torch then drops the first definitions, and every later call of them
fails)."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Run from the repository root, whose folder ``kernels/`` comes first on sys.path.
PROBE = """
import importlib, torch
{setup}
import moe.kernels
from torch._library.custom_ops import OPDEFS
ops = {{name: OPDEFS[name] for name in ("moe::gmm", "moe::gmm_wgrad")}}
top = importlib.import_module("kernels")
{check}
assert all(OPDEFS[name] is op for name, op in ops.items()), "our ops were defined again"
x, w = torch.randn(5, 4), torch.randn(2, 4, 3)
y = moe.kernels.grouped_mm(x, w, torch.tensor([2, 5], dtype=torch.int32), "loop")
torch.testing.assert_close(y[:2], x[:2] @ w[0])
print("ok")
"""

HUB_PACKAGE = """
assert top is not moe.kernels and {repo!r} not in top.__file__, top.__file__
from transformers.integrations import hub_kernels  # imports names from the Hub's package
"""

# The Hub's package not installed: the finder that looks past the repository root finds
# nothing.
NO_HUB_PACKAGE = """
from importlib.machinery import PathFinder
find = PathFinder.find_spec
PathFinder.find_spec = classmethod(
    lambda cls, name, path=None, target=None: None
    if name == "kernels" and path is not None
    else find(name, path, target)
)
"""


def _run(setup: str, check: str) -> None:
    probe = PROBE.format(setup=setup, check=check)
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def _hub_package_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


in_source_tree = pytest.mark.skipif(
    not (REPO / "kernels" / "__init__.py").exists(), reason="tests copied out of the source tree"
)


@in_source_tree
@pytest.mark.skipif(not _hub_package_installed(), reason="the Hub's kernels package is absent")
def test_top_level_kernels_is_the_hub_package_where_installed():
    _run("", HUB_PACKAGE.format(repo=str(REPO / "kernels")))


@in_source_tree
def test_top_level_kernels_is_moe_kernels_without_the_hub_package():
    _run(NO_HUB_PACKAGE, "assert top is moe.kernels")
