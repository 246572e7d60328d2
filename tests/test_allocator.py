"""Host memory: ``import moe`` puts torch's large CPU tensors on transparent huge pages,
unless the user said otherwise (moe/__init__.py says why), and the trainer keeps freed
blocks in the process for reuse (moe/train/host_memory.py)."""

import os
import platform
import subprocess
import sys

import pytest

SHOW = "import moe, os; print(os.environ['THP_MEM_ALLOC_ENABLE'])"


def setting(env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_huge_pages_on_by_default_and_a_users_choice_kept():
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert setting(env) == "1"
    assert setting({**env, "THP_MEM_ALLOC_ENABLE": "0"}) == "0"


# Bytes glibc holds in mmap-ed blocks grown by one new 64 MB tensor, after the trainer's
# keep_freed_host_memory() or without it.
MMAPPED_GROWTH = """
import ctypes, sys, torch
from moe.train.host_memory import keep_freed_host_memory
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS.split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
before = libc.mallinfo2().hblkhd
block = torch.empty(64 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="glibc's allocator only",
)
def test_kept_host_memory_serves_large_blocks_from_the_heap():
    def growth(mode: str) -> int:
        cmd = [sys.executable, "-c", MMAPPED_GROWTH, mode]
        out = subprocess.run(cmd, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip())

    assert growth("release") >= 64 << 20  # glibc's default: a block that large is mmap-ed
    assert growth("keep") == 0  # from the heap, which is never trimmed: reused next step
