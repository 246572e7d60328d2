"""``import moe`` puts torch's large CPU tensors on transparent huge pages, unless the user
said otherwise (moe/__init__.py says why)."""

import os
import subprocess
import sys

SHOW = "import moe, os; print(os.environ['THP_MEM_ALLOC_ENABLE'])"


def setting(env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_huge_pages_on_by_default_and_a_users_choice_kept():
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert setting(env) == "1"
    assert setting({**env, "THP_MEM_ALLOC_ENABLE": "0"}) == "0"
