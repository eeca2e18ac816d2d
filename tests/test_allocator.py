"""The CPU allocator setting (mllm_kd/runtime/allocator.py): a freed large block stays in the heap for reuse."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import pytest

from mllm_kd.runtime.allocator import _glibc_mallopt, reuse_freed_memory

# A training step's embedding gradient: a [49153, 576] float32 buffer (108 MiB) allocated, then freed. Prints
# glibc's mallinfo2 (MiB) while it lives and after: bytes in mmap-ed blocks, free bytes kept in the heap.
PROBE = """
import ctypes, json, sys
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "reuse":
    from mllm_kd.runtime.allocator import reuse_freed_memory
    assert reuse_freed_memory()
import torch
def info():
    m = libc.mallinfo2()
    return {"mmapped": m.hblkhd >> 20, "kept": m.fordblks >> 20}
before = info()
g = torch.zeros(49153, 576)
alive = info()
del g
print(json.dumps({"before": before, "alive": alive, "freed": info()}))
"""


def _has_mallinfo2() -> bool:  # glibc >= 2.33
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


glibc = pytest.mark.skipif(
    _glibc_mallopt() is None or not _has_mallinfo2(), reason="glibc >= 2.33 (mallopt, mallinfo2) only"
)


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@glibc
def test_default_allocator_returns_a_large_block_to_the_os():
    m = _probe("default")
    assert m["alive"]["mmapped"] - m["before"]["mmapped"] >= 100  # its own mmap ...
    assert m["freed"]["mmapped"] == m["before"]["mmapped"]  # ... unmapped on free
    assert m["freed"]["kept"] < 100


@glibc
def test_reuse_keeps_a_freed_large_block_in_the_heap():
    m = _probe("reuse")
    assert m["alive"]["mmapped"] == m["before"]["mmapped"]  # served from the heap
    assert m["freed"]["kept"] >= 100  # and kept there for the next step


@glibc
def test_opt_out(monkeypatch):
    monkeypatch.setenv("MLLM_KD_MALLOC", "default")
    assert reuse_freed_memory() is False
