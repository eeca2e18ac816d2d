"""The one way work is split across processes: contiguous chunks, process ``index`` of ``count``."""

from __future__ import annotations


def chunk_bounds(n: int, index: int, count: int) -> tuple[int, int]:
    """Positions ``[lo, hi)`` of contiguous chunk ``index`` of ``count`` over ``n`` items (sizes differ by
    at most one; in order, so concatenating the chunks gives the items back)."""
    return n * index // count, n * (index + 1) // count
