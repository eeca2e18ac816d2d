"""Preemption: SIGTERM (Kubernetes, Slurm preemption) or SIGUSR1 (Slurm's ``--signal=USR1@90``) asks a
stage to finish its current optimizer step, write a step checkpoint and exit with :data:`PREEMPTED_EXIT`.

The handler only records the signal, so a second signal during the save changes nothing. With several
processes every rank reports its flag in one all-reduce per step, so all ranks stop after the same step
even when only one was signalled. See docs/scale-out.md for the job script that requeues.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from mllm_kd.atomic import atomic_write_bytes
from mllm_kd.runtime.distributed import DistInfo, any_rank

PREEMPTED_EXIT = 75  # EX_TEMPFAIL (sysexits.h): "temporary failure, try again" -- requeue the job
MARKER = "PREEMPTED"  # written in the stage directory on preemption (torchrun reports any worker exit as 1)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The stage stopped on a signal after writing ``checkpoint``; re-running the command resumes it."""

    def __init__(self, stage: str, step: int, signum: int | None, checkpoint: Path):
        why = signal.Signals(signum).name if signum else "a signal to another rank"
        super().__init__(f"{stage}: stopped on {why} after step {step}; checkpoint {checkpoint}")
        self.step, self.signum, self.checkpoint = step, signum, checkpoint


class StopRequest:
    """Records SIGTERM / SIGUSR1 while :meth:`installed`; the training loop asks :meth:`agreed` each step."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal this process received
        self.stopping = False  # some rank was signalled: this one stops too

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:  # the first signal counts; later ones (e.g. forwarded by torchrun) are no-ops
            self.signum = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle the signals inside the block (main thread only: Python's rule for signal handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            # once stopping, keep ignoring the signals until the process exits: torchrun sends SIGTERM to
            # the ranks still running when the first one exits, and the exit status must stay 75
            if not self.stopping:
                for s, h in previous.items():
                    signal.signal(s, h)

    def agreed(self, dist: DistInfo) -> bool:
        """True on every rank if any rank was signalled (one all-reduce; none for one process)."""
        self.stopping = any_rank(dist, self.signum is not None)
        return self.stopping

    def stopped(self, stage: str, stage_dir: Path, step: int, checkpoint: Path, is_main: bool) -> Preempted:
        """The exception that ends the stage; rank 0 leaves :data:`MARKER` in the stage directory."""
        if is_main:
            info = {"step": step, "checkpoint": str(checkpoint)}
            atomic_write_bytes(stage_dir / MARKER, json.dumps(info).encode())
        return Preempted(stage, step, self.signum, checkpoint)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Slurm signals every process of a job step, and a data worker killed
    by SIGUSR1 or SIGTERM would end the training process before it could save; the workers stop when
    the training process does."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def clear_marker(stage_dir: Path) -> None:
    (stage_dir / MARKER).unlink(missing_ok=True)
