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
from moe.train.host_memory import keep_freed_memory, return_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
applied = {"keep": keep_freed_memory, "return": return_freed_memory}.get(sys.argv[1], lambda: False)()
n = int(sys.argv[2])
before = libc.mallinfo2().hblks
t = torch.empty(n)
t.fill_(1.0)
del t
t = torch.empty(n)
print(applied, libc.mallinfo2().hblks - before)
"""


def _mmapped_blocks(policy: str, floats: int = 16 * 2**20):  # 64 MiB: over glibc's largest mmap threshold
    out = subprocess.run([sys.executable, "-c", CHILD, policy, str(floats)], capture_output=True, text=True,
                         check=True)
    applied, blocks = out.stdout.split()
    return applied == "True", int(blocks)


def test_default_glibc_mmaps_large_blocks():
    # the behaviour the policy exists to change (if glibc stops doing this, the policy is moot)
    assert _mmapped_blocks("default") == (False, 1)


def test_keep_freed_memory_serves_large_blocks_from_the_heap():
    assert _mmapped_blocks("keep") == (True, 0)


def test_return_freed_memory_maps_every_large_block_again():
    """A 4 MiB block freed and asked for again: glibc's default raised its threshold at the free and serves
    it from the heap (where it stays, resident, when freed); the return policy maps it anew (and unmaps it
    when freed). Both map a 64 MiB block."""
    assert _mmapped_blocks("default", 2**20) == (False, 0)
    assert _mmapped_blocks("return", 2**20) == (True, 1)
    assert _mmapped_blocks("return") == (True, 1)


def test_one_policy_per_process():
    code = ("from moe.train.host_memory import keep_freed_memory as k, return_freed_memory as r; "
            "print(k(), r())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_keep_freed_memory_is_idempotent():
    code = "from moe.train.host_memory import keep_freed_memory as k; print(k(), k())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_moe_info_reports_the_policy():
    out = subprocess.run([sys.executable, "-m", "moe.cli", "info"], capture_output=True, text=True, check=True)
    assert host_memory.can_keep_freed_memory()
    assert "host memory" in out.stdout and "training keeps freed memory for reuse" in out.stdout
