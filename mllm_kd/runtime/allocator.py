"""The C allocator of a CPU run: keep freed large blocks for reuse instead of handing them back to the OS.

glibc's ``malloc`` serves a block above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and returns it
to the OS on ``free``; the next block of that size faults every page in again. A training step frees and
re-allocates its large tensors each time, the ``[V, d]`` embedding gradient first of all (113 MB for SmolLM2's
49,153 x 576), so a CPU run spends a share of every step on page faults (the embedding gradient's ``fill_``
took ~100 ms of a 1.6 s step of the easy-VQA student). ``mallopt(M_MMAP_MAX, 0)`` serves every block from the
heap and a high ``M_TRIM_THRESHOLD`` keeps freed heap memory mapped, so the next step reuses it: the
allocator settings PyTorch's CPU performance guides reach with jemalloc or tcmalloc, without a preloaded
library. Measured in docs/performance.md (7% per student training step, 8% for generation, peak RSS +7%).

glibc only (Linux); elsewhere, or with ``MLLM_KD_MALLOC=default`` in the environment, nothing changes.
glibc still falls back to ``mmap`` where the heap cannot grow.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB of freed memory at the top of the heap
OPT_OUT = "MLLM_KD_MALLOC"


def reuse_freed_memory() -> bool:
    """Set glibc's allocator to keep freed large blocks (once per process; later calls repeat it harmlessly).

    Returns whether it was set: False without glibc or with ``MLLM_KD_MALLOC=default``.
    """
    if os.environ.get(OPT_OUT, "").strip().lower() == "default":
        return False
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("mallopt refused the settings: the allocator keeps its defaults")
    return ok


def _glibc_mallopt():
    name = ctypes.util.find_library("c")
    if not name or "libc.so" not in name:  # musl, macOS, Windows: other allocators, other options
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
    except (OSError, AttributeError):
        return None
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt
