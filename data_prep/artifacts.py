"""Outputs rebuilt only when their inputs changed: a list of artifacts and the manifest that records them.

A converter describes each output unit as an :class:`Artifact` (its files, the parameters and source its
content depends on, how to build it) and hands the ordered list to :func:`build_artifacts`. An artifact
is skipped when the manifest's record of it has the same inputs key (format version, name, parameters,
source digest) and its files on disk still hash to the recorded SHA-256; otherwise its old files are
removed and it is rebuilt, and the manifest is saved after each rebuilt artifact, so an interrupted run
redoes only the unfinished ones.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm_kd.atomic import atomic_write_bytes
from mllm_kd.data_prep.llava_format import files_digest, json_bytes

__all__ = ["Artifact", "build_artifacts", "files_named", "files_under", "load_manifest", "sha256_json"]


@dataclass
class Artifact:
    """One output unit, skipped or rebuilt as a whole."""

    name: str
    describe: str  # its files relative to the output directory, for the log
    params: dict[
        str, Any
    ]  # everything besides the format version its content depends on; "source" names its input
    existing: Callable[[], list[Path]]
    build: Callable[[], dict[str, Any]]  # writes the files, returns counts


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def files_under(directory: Path, pattern: str) -> Callable[[], list[Path]]:
    return lambda: sorted(p for p in directory.glob(pattern) if p.is_file())


def files_named(*paths: Path) -> Callable[[], list[Path]]:
    return lambda: [p for p in paths if p.is_file()]


def load_manifest(path: Path) -> dict[str, Any]:
    """The manifest at ``path``, or ``{}`` when it is missing or unreadable (then nothing is skipped)."""
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def build_artifacts(
    out: Path,
    manifest_path: Path,
    manifest: dict[str, Any],
    artifacts: list[Artifact],
    source_digest: Callable[[str], str],
    format_version: int,
    *,
    force: bool = False,
    emit: Callable[[str], None] = lambda _line: None,
) -> dict[str, str]:
    """Skip or rebuild each of ``artifacts`` in order (module docstring); returns {name: "wrote" | "skipped"}.

    ``manifest``: the new manifest's fixed fields (arguments, source package); this fills in its
    ``source`` digests (``<source>_sha256``), ``artifacts``, ``counts`` and ``content_hash`` and writes it
    to ``manifest_path`` (only when it changed, so a rerun that skips everything leaves every mtime alone).
    ``source_digest(name)``: the digest of the input an artifact's ``params["source"]`` names.
    """
    previous = load_manifest(manifest_path)
    old_records = previous.get("artifacts") if isinstance(previous.get("artifacts"), dict) else {}
    manifest.setdefault("source", {})
    manifest["artifacts"] = {}
    actions: dict[str, str] = {}

    def save() -> None:
        hashes = {name: rec["sha256"] for name, rec in sorted(manifest["artifacts"].items())}
        manifest["content_hash"] = sha256_json(hashes)
        manifest["counts"] = {
            f"{name}.{key}": value
            for name, rec in manifest["artifacts"].items()
            for key, value in rec["counts"].items()
        }
        data = json_bytes(manifest, indent=2) + b"\n"
        if not manifest_path.is_file() or manifest_path.read_bytes() != data:
            atomic_write_bytes(manifest_path, data)

    for artifact in artifacts:
        source = artifact.params["source"]
        digest = source_digest(source)
        manifest["source"][f"{source}_sha256"] = digest
        key = sha256_json(
            {"format_version": format_version, "artifact": artifact.name, **artifact.params, "digest": digest}
        )
        old = old_records.get(artifact.name)
        files = artifact.existing()
        if (
            not force
            and isinstance(old, dict)
            and old.get("key") == key
            and files
            and files_digest(out, files) == old.get("sha256")
        ):
            manifest["artifacts"][artifact.name] = old
            actions[artifact.name] = "skipped"
        else:
            for path in files:
                path.unlink()
            counts = artifact.build()
            files = artifact.existing()
            manifest["artifacts"][artifact.name] = {
                "key": key,
                "files": len(files),
                "bytes": sum(p.stat().st_size for p in files),
                "sha256": files_digest(out, files),
                "counts": counts,
            }
            actions[artifact.name] = "wrote"
            save()  # progress per artifact: an interrupted run redoes only the unfinished ones
        rec = manifest["artifacts"][artifact.name]
        counts_text = ", ".join(f"{k}={v}" for k, v in rec["counts"].items())
        emit(f"{actions[artifact.name]:>7} {out}/{artifact.describe}: {rec['files']} files; {counts_text}")
    save()
    return actions
