"""moe.train.host_memory: the process-wide malloc policy, checked in child processes (it cannot be undone)."""
import subprocess
import sys

import pytest

from moe.train import host_memory

pytestmark = pytest.mark.skipif(host_memory._libc() is None, reason="needs glibc (mallopt)")

# Counts the blocks glibc has mmap-ed (mallinfo2().hblks) while a 64 MiB tensor is alive, after freeing
# and allocating it again.
CHILD = r"""
import ctypes, sys
import torch
from moe.train.host_memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
before = libc.mallinfo2().hblks
t = torch.empty(16 * 2**20)  # 64 MiB, over glibc's largest mmap threshold
t.fill_(1.0)
del t
t = torch.empty(16 * 2**20)
print(applied, libc.mallinfo2().hblks - before)
"""


def _mmapped_blocks(policy: str):
    out = subprocess.run([sys.executable, "-c", CHILD, policy], capture_output=True, text=True, check=True)
    applied, blocks = out.stdout.split()
    return applied == "True", int(blocks)


def test_default_glibc_mmaps_large_blocks():
    # the behaviour the policy exists to change (if glibc stops doing this, the policy is moot)
    assert _mmapped_blocks("default") == (False, 1)


def test_keep_freed_memory_serves_large_blocks_from_the_heap():
    assert _mmapped_blocks("keep") == (True, 0)


def test_keep_freed_memory_is_idempotent():
    code = "from moe.train.host_memory import keep_freed_memory as k; print(k(), k())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_moe_info_reports_the_policy():
    out = subprocess.run([sys.executable, "-m", "moe.cli", "info"], capture_output=True, text=True, check=True)
    assert host_memory.can_keep_freed_memory()
    assert "host memory" in out.stdout and "training keeps freed memory for reuse" in out.stdout
