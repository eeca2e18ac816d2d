"""Checkpoint integrity: every checkpoint directory ends with ``manifest.json``, the size and SHA-256 of
each of its files, written last. Loading verifies it, so a truncated, missing or altered file is named
instead of failing somewhere inside a loader (or, worse, loading silently).

Step checkpoints (``checkpoints/step-N``) are listed, verified newest first and pruned here: a damaged
newest one is moved aside (``step-N.corrupt``) and the previous intact one is used.

Cost: verifying reads every byte once (SHA-256 on one CPU core: ~1 s per 500 MB measured, see
docs/scale-out.md), 15-30 s for a 7B model in bf16; about the same again to write the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from mllm_kd.atomic import atomic_write_bytes
from mllm_kd.errors import CheckpointError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_STEP = re.compile(r"step-(\d+)")
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: str | Path) -> dict:
    """Record the size and SHA-256 of every file under ``directory`` in ``directory/manifest.json``.

    Call it last: a checkpoint directory without its manifest was never completed.
    """
    directory = Path(directory)
    files = {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in _files(directory)
    }
    manifest = {"format": 1, "files": files}
    atomic_write_bytes(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def verify_checkpoint(directory: str | Path, what: str = "checkpoint") -> None:
    """Raise CheckpointError naming the first file of ``directory`` that does not match its manifest.

    A directory without a manifest was written before checkpoints carried one: it is accepted unverified
    (with a warning).
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        log.warning("%s %s has no %s (written by an older mllm-kd): not verified", what, directory, MANIFEST)
        return
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{what} {directory}: {path} is not a valid manifest ({e})") from e
    for rel, expected in files.items():
        f = directory / rel
        if not f.is_file():
            raise CheckpointError(f"{what} {directory}: {f} is missing (listed in {MANIFEST})")
        size = f.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(
                f"{what} {directory}: {f} has {size} bytes, {MANIFEST} says {expected['size']} (truncated or overwritten)"
            )
        if sha256_file(f) != expected["sha256"]:
            raise CheckpointError(
                f"{what} {directory}: {f} does not match its SHA-256 in {MANIFEST} (altered)"
            )


def step_checkpoints(stage_dir: str | Path) -> list[Path]:
    """The ``checkpoints/step-N`` directories of a stage directory, oldest first."""
    root = Path(stage_dir) / "checkpoints"
    if not root.is_dir():
        return []
    steps = [p for p in root.iterdir() if p.is_dir() and _STEP.fullmatch(p.name)]
    return sorted(steps, key=lambda p: int(p.name.split("-")[1]))


def latest_step_checkpoint(stage_dir: str | Path) -> Path | None:
    """The newest step checkpoint that verifies against its manifest, or None.

    A newer one that does not is logged (naming the file) and renamed to ``step-N.corrupt`` so that it is
    neither resumed from nor counted by pruning; delete it once inspected. Temporary directories of
    writes that a killed process left behind are removed (they are never read).
    """
    root = Path(stage_dir) / "checkpoints"
    for partial in root.glob(".step-*.tmp-*") if root.is_dir() else []:
        log.info("removing %s, left by a write that did not finish", partial)
        shutil.rmtree(partial, ignore_errors=True)
    for ckpt in reversed(step_checkpoints(stage_dir)):
        if not (ckpt / MANIFEST).is_file() and not (ckpt / "trainer_state.json").is_file():
            continue  # neither completed nor an older-format checkpoint
        try:
            verify_checkpoint(ckpt, "step checkpoint")
            return ckpt
        except CheckpointError as e:
            aside = ckpt.with_name(ckpt.name + ".corrupt")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(ckpt, aside)
            log.warning("%s; moved to %s, falling back to the previous checkpoint", e, aside)
    return None


def prune_step_checkpoints(stage_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints (call only once the newest one is complete)."""
    steps = step_checkpoints(stage_dir)
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def directory_bytes(directory: str | Path) -> int:
    directory = Path(directory)
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else 0
