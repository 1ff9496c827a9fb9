"""recsys.hardware.keep_freed_memory: glibc's thresholds really change, and only where glibc is the C library."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO))

SCRIPT = """
import ctypes, sys
from recsys import hardware
libc = ctypes.CDLL("libc.so.6")
big = 64 << 20  # above glibc's largest dynamic mmap threshold (32 MB): served by mmap unless the threshold moved
print(hardware.keep_freed_memory(), hardware.keep_freed_memory())
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
p = libc.malloc(big)
print(libc.mallinfo2().hblkhd >= big)  # bytes in mmapped blocks: the 64 MB block is NOT one of them
libc.free(p)
"""


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc", reason="needs glibc")
def test_large_allocations_stay_in_the_heap_after_keep_freed_memory():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, env=ENV,
                         cwd=REPO).stdout.split()
    assert out == ["True", "True", "False"]


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc", reason="needs glibc")
def test_without_it_large_allocations_are_mmapped():
    """The control: the same 64 MB allocation in a fresh process is an mmapped block (so the test above can fail)."""
    script = SCRIPT.replace("print(hardware.keep_freed_memory(), hardware.keep_freed_memory())", "")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=ENV,
                         cwd=REPO).stdout.split()
    assert out == ["True"]


def test_intra_op_threads_sets_the_count_inside_and_restores_it_after_an_error():
    import torch

    from recsys.hardware import intra_op_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with intra_op_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError):
            with intra_op_threads(1):
                raise ValueError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
