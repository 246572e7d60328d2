"""The ``kernels/`` folder imported under its own name, as happens when the repository
root is on sys.path (pytest, ``python -m`` in a checkout) and transformers probes for the
Hub's ``kernels`` package: it must be ``moe.kernels`` itself, not a second copy that
defines our custom ops again (torch then drops the first definitions, and every later call
of them fails)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import importlib, torch
import moe.kernels
from torch._library.custom_ops import OPDEFS
ops = {name: OPDEFS[name] for name in ("moe::gmm", "moe::gmm_wgrad")}
assert importlib.import_module("kernels") is moe.kernels
assert all(OPDEFS[name] is op for name, op in ops.items()), "our ops were defined again"
from transformers.utils.import_utils import is_kernels_available
assert not is_kernels_available()  # our folder is not the Hub's package
x, w = torch.randn(5, 4), torch.randn(2, 4, 3)
y = moe.kernels.grouped_mm(x, w, torch.tensor([2, 5], dtype=torch.int32), "loop")
torch.testing.assert_close(y[:2], x[:2] @ w[0])
print("ok")
"""


@pytest.mark.skipif(
    not (REPO / "kernels" / "__init__.py").exists(), reason="tests copied out of the source tree"
)
def test_kernels_folder_imported_by_its_own_name_is_moe_kernels():
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
