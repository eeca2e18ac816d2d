"""Answer files of ``python -m mllm_kd.eval run``: which questions a file already answers (resume), which
chunk of the questions a process answers, and the merge of the chunk files into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mllm_kd.atomic import atomic_write_bytes
from mllm_kd.data.records import IMAGE_TOKEN
from mllm_kd.errors import ConfigError, DataError
from mllm_kd.eval.core import Question, qid_key
from mllm_kd.runtime.work import chunk_bounds

AnswerKey = tuple[str, Any, str]


def chunk_of(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """``(index, count)`` from the flags or, under torchrun, from ``RANK`` / ``WORLD_SIZE``."""
    flags = args.chunk_index is not None or args.chunk_count is not None
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if flags:
        if args.chunk_index is None or args.chunk_count is None:
            raise ConfigError("--chunk-index and --chunk-count go together")
        if world > 1:
            raise ConfigError("use either --chunk-index/--chunk-count or torchrun (WORLD_SIZE), not both")
        index, count = args.chunk_index, args.chunk_count
    else:
        index, count = int(env.get("RANK", "0") or 0), world
    if not 0 <= index < count:
        raise ConfigError(f"chunk index {index} is not in 0..{count - 1}")
    return index, count


def chunk_path(out: Path, index: int, count: int) -> Path:
    return out.with_name(f"{out.stem}.chunk{index}-of-{count}{out.suffix or '.jsonl'}")


def question_key(q: Question) -> AnswerKey:
    return (qid_key(q.question_id), q.extra.get("round_id"), q.prompt)


def answer_key(row: dict) -> AnswerKey:
    prompt = str(row.get("prompt") or "").removeprefix(f"{IMAGE_TOKEN}\n")
    return (qid_key(row["question_id"]), row.get("round_id"), prompt)


def read_answer_lines(path: Path) -> tuple[list[tuple[int, dict, str]], bool]:
    """Complete answer lines ``(line number, object, text)`` and whether the file needs repair (a torn
    last line, or no newline at the end). A bad line before the last is a DataError."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if not (isinstance(obj, dict) and "question_id" in obj and isinstance(obj.get("text"), str)):
            if n == len(lines):  # cut off by an interrupted write
                return rows, True
            raise DataError(
                f"{path}:{n}: not an answer line (JSON with 'question_id' and 'text'); fix or remove the file"
            )
        rows.append((n, obj, line))
    return rows, bool(text) and not text.endswith("\n")


def match_answers(path: Path, rows: list[tuple[int, dict, str]], questions: list[Question]) -> list[int]:
    """The position in ``questions`` of each row; a row of no (or an already answered) question is an error."""
    free: dict[AnswerKey, list[int]] = {}
    for i, q in enumerate(questions):
        free.setdefault(question_key(q), []).append(i)
    out = []
    for n, obj, _ in rows:
        key = answer_key(obj)
        if not free.get(key):
            what = "answered twice" if key in free else "not among this run's questions"
            raise DataError(
                f"{path}:{n}: question_id {obj['question_id']!r} is {what} (another task, split, --limit or "
                "chunk count?); remove the file or choose another --out"
            )
        out.append(free[key].pop(0))
    return out


def pending(path: Path, questions: list[Question]) -> list[Question]:
    """The questions ``path`` does not answer yet; repairs a torn last line first."""
    if not path.exists():
        return list(questions)
    rows, torn = read_answer_lines(path)
    answered = set(match_answers(path, rows, questions))
    if torn:
        atomic_write_bytes(path, "".join(line + "\n" for _, _, line in rows).encode("utf-8"))
        print(f"run: {path}: dropped a torn last line", file=sys.stderr)
    return [q for i, q in enumerate(questions) if i not in answered]


def complete_lines(path: Path, questions: list[Question]) -> list[str] | None:
    """``path``'s lines in question order if it answers every question exactly once, else None.

    Only reads (another process may be appending): a torn or foreign line means "not complete".
    """
    if not path.is_file():
        return [] if not questions else None  # an empty chunk (fewer questions than chunks)
    try:
        rows, torn = read_answer_lines(path)
        order = match_answers(path, rows, questions)
    except DataError:
        return None
    if torn or len(order) != len(questions):
        return None
    return [line for _, (_, _, line) in sorted(zip(order, rows), key=lambda x: x[0])]


def merge_chunks(out: Path, questions: list[Question], count: int) -> bool:
    """Write ``out`` from the ``count`` chunk files if all are complete; False (nothing written) if not."""
    merged: list[str] = []
    for i in range(count):
        lo, hi = chunk_bounds(len(questions), i, count)
        lines = complete_lines(chunk_path(out, i, count), questions[lo:hi])
        if lines is None:
            return False
        merged += lines
    atomic_write_bytes(out, "".join(line + "\n" for line in merged).encode("utf-8"))
    return True
