"""The demo's phases: a log line as each starts and ends, with its elapsed time, and their table."""

from __future__ import annotations

import contextlib
import logging
import time


class Phases:
    """One log line per phase of the demo as it starts and ends (with its elapsed time), and the table of
    them all at the end: ``with phases("teacher"): ...`` then :meth:`table`."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.rows: list[tuple[str, float]] = []
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        self.log.info("== phase %d: %s", len(self.rows) + 1, name)
        yield
        dt = time.perf_counter() - t0
        self.rows.append((name, dt))
        self.log.info(
            "== phase %d: %s done in %.0f s (%.0f s since the start)",
            len(self.rows),
            name,
            dt,
            time.perf_counter() - self.started,
        )

    def table(self) -> str:
        total = sum(dt for _, dt in self.rows)
        lines = ["| phase | seconds |", "|---|---|", *(f"| {n} | {dt:,.0f} |" for n, dt in self.rows)]
        return "\n".join([*lines, f"| total | {total:,.0f} |"])
