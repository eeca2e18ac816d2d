"""Shared helpers for converters that write LLaVA-format data: records, validation, shards, files.

A LLaVA record is ``{"id": str, "image": str (optional), "conversations": [{"from": "human"|"gpt",
"value": str}, ...]}``; :func:`make_conversation` puts a record's one ``<image>`` placeholder at the start
of the first human turn (``"<image>\\n..."``). Records are checked by the library's own validator,
:func:`mllm_kd.data.records.validate_record`, the one the training data loader applies.

WebDataset shards written by :func:`write_wds_shards` hold one sample per record: ``__key__`` is the
sanitised id (:func:`sanitize_key`), ``json`` is the UTF-8 JSON of the record (the same object as in the
JSON file) and ``png``/``jpg`` the raw bytes of its single image (absent for text-only records).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mllm_kd.data.records import IMAGE_TOKEN, validate_record
from mllm_kd.errors import DataError

IMAGE_PLACEHOLDER = IMAGE_TOKEN

# LLaVA-1.5's suffix for short-answer VQA questions (VQAv2, GQA, ...), put on its own line after the
# question, in training data and evaluation prompts alike.
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."

Record = dict[str, Any]


def short_answer_question(question: str) -> str:
    """The question followed, on a new line, by :data:`SHORT_ANSWER_PROMPT` (LLaVA-1.5 style)."""
    return f"{question}\n{SHORT_ANSWER_PROMPT}"


def make_conversation(turns: Sequence[tuple[str, str]], with_image: bool = True) -> list[dict[str, str]]:
    """LLaVA ``conversations`` from (human, gpt) pairs; the first human turn gets ``"<image>\\n"``."""
    if not turns:
        raise DataError("a conversation needs at least one (question, answer) turn")
    conversation: list[dict[str, str]] = []
    for i, (human, gpt) in enumerate(turns):
        if i == 0 and with_image:
            human = f"{IMAGE_PLACEHOLDER}\n{human}"
        conversation.append({"from": "human", "value": human})
        conversation.append({"from": "gpt", "value": gpt})
    return conversation


def sanitize_key(sample_id: str) -> str:
    """A WebDataset ``__key__`` for ``sample_id``: anything but letters, digits, ``-`` and ``_`` -> ``_``.

    Dots must go because WebDataset splits a tar member name at its first dot into key and extension;
    slashes because they would make directories inside the tar.
    """
    return re.sub(r"[^A-Za-z0-9_-]", "_", sample_id)


def json_bytes(obj: Any, indent: int | None = None) -> bytes:
    """Deterministic UTF-8 JSON (key order as built, non-ASCII kept) so reruns give identical bytes."""
    return json.dumps(obj, ensure_ascii=False, indent=indent).encode("utf-8")


def write_wds_shards(
    samples: Iterable[tuple[Record, bytes | None, str]], pattern: Path, shard_size: int
) -> list[Path]:
    """Write (record, image bytes or None, image extension) samples to shards named ``pattern % i``.

    Returns the shard paths. Tar member times are fixed (mtime 0) so identical input gives identical
    shards. Raises :class:`DataError` for an invalid record or two ids that sanitise to the same key.
    """
    import webdataset as wds

    if shard_size < 1:
        raise DataError(f"shard size must be >= 1, got {shard_size}")
    pattern.parent.mkdir(parents=True, exist_ok=True)
    seen: dict[str, str] = {}
    written: list[str] = []
    # post= is called with each finished shard's name, the reliable way to learn which files exist.
    with wds.ShardWriter(
        str(pattern), maxcount=shard_size, verbose=0, mtime=0.0, post=written.append
    ) as sink:
        for record, image, ext in samples:
            if not isinstance(record.get("id"), str) or not record["id"]:
                raise DataError(f"a shard sample needs a string id (its key): {record!r:.200}")
            validate_record(record, f"shard sample {record['id']!r}")
            key = sanitize_key(record["id"])
            if key in seen:
                raise DataError(f"ids {seen[key]!r} and {record['id']!r} both give the shard key {key!r}")
            seen[key] = record["id"]
            sample: dict[str, Any] = {"__key__": key, "json": json_bytes(record)}
            if image is not None:
                sample[ext] = image
            sink.write(sample)
    return [Path(name) for name in written]


def files_digest(root: Path, files: Iterable[Path]) -> str:
    """SHA-256 over the (path relative to ``root``, content) of ``files``, in sorted path order."""
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix().encode("utf-8")
        data = path.read_bytes()
        digest.update(len(rel).to_bytes(8, "little") + rel + len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()
