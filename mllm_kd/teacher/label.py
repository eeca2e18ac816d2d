"""The teacher answers questions nobody labelled: a transfer set for distillation.

``python -m mllm_kd.teacher.label --teacher CKPT --data FILE [--start N] [--count M] --out OUT.json``

Reads one-question LLaVA records (``data.format: llava_json``: a human turn with ``<image>``, and a gpt turn
or none), drops any answer the file holds, and writes the same records with the teacher's greedy answer as
the gpt turn. A distillation stage then trains on ``OUT.json`` like on any data (``stages.stage3.data.path``,
with a teacher cache built from it): the student's DFT runs on inputs the teacher answered, as Hinton et al.
(2015) distil on a transfer set and Kim & Rush (2016) train on the teacher's sequences, here generated once.

The answers go through :func:`mllm_kd.model.generate.answer_file` into ``OUT.answers.jsonl`` first
(resumable: an interrupted run answers only what is missing); ``OUT.json`` is written atomically at the
end, in the input's record order, with ``OUT.source.json`` naming what it was made from (the teacher's
checkpoint manifest and the questions): answers from another teacher or other questions are never reused.
The records' own answers are never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from mllm_kd.atomic import atomic_write_bytes
from mllm_kd.data.records import IMAGE_TOKEN
from mllm_kd.errors import ArgumentParser, DataError, MllmKdError, exit_code

log = logging.getLogger("mllm_kd.teacher.label")


def questions_of(records: list[dict], where: str) -> list[dict]:
    """One LLaVA question (``question_id``, ``image``, ``text``) per record: its human turn. A record with more
    than one question, without an image or without ``<image>`` in its question is a :class:`DataError` naming
    it."""
    out = []
    for i, rec in enumerate(records):
        rid = rec.get("id", f"#{i}") if isinstance(rec, dict) else f"#{i}"
        turns = rec.get("conversations") if isinstance(rec, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
            raise DataError(f"{where}: sample {rid!r} has no conversations (a list of turns)")
        humans = [t for t in turns if t.get("from") == "human"]
        if len(humans) != 1 or turns[0].get("from") != "human" or len(turns) > 2:
            raise DataError(
                f"{where}: sample {rid!r}: the teacher answers one question per record "
                f"(a human turn and at most its answer), got {len(turns)} turns"
            )
        if not isinstance(rec.get("image"), str) or not isinstance(humans[0].get("value"), str):
            raise DataError(f"{where}: sample {rid!r} needs one image path and a question text")
        if IMAGE_TOKEN not in humans[0]["value"]:
            raise DataError(f"{where}: sample {rid!r}: its question has no {IMAGE_TOKEN} placeholder")
        out.append({"question_id": str(rid), "image": rec["image"], "text": humans[0]["value"]})
    if len({q["question_id"] for q in out}) != len(out):
        raise DataError(f"{where}: the records' ids must be unique (answers are matched to them by id)")
    return out


def _source(teacher: str | Path, questions: list[dict], max_new_tokens: int) -> dict:
    from mllm_kd.checkpoint.native import resolve_checkpoint

    ckpt = resolve_checkpoint(teacher, "teacher checkpoint")
    stamp = ckpt / "manifest.json" if (ckpt / "manifest.json").is_file() else ckpt / "trainer_state.json"
    manifest = stamp.read_bytes()
    return {
        "teacher": str(ckpt.resolve()),
        "teacher_manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "questions_sha256": hashlib.sha256(json.dumps(questions, sort_keys=True).encode()).hexdigest(),
        "max_new_tokens": max_new_tokens,
    }


def _source_path(out: Path) -> Path:
    return out.with_suffix(".source.json")


def labelled_by(
    out: str | Path,
    teacher: str | Path,
    records: list[dict],
    max_new_tokens: int = 16,
    where: str = "records",
) -> bool:
    """Whether ``out`` already holds ``teacher``'s answers to exactly these records (``where`` names them in
    errors)."""
    out = Path(out)
    try:
        recorded = json.loads(_source_path(out).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return out.is_file() and recorded == _source(teacher, questions_of(records, where), max_new_tokens)


def label_records(
    teacher: str | Path,
    records: list[dict],
    image_folder: str | Path,
    out: str | Path,
    *,
    device: torch.device | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 16,
    progress: bool = True,
    where: str = "records",
) -> Path:
    """Write ``records`` to ``out`` (a LLaVA JSON list) with each answer replaced by the teacher's.

    ``teacher``: a checkpoint (it answers greedily, prompted as it was trained). Returns ``out``."""
    from mllm_kd.checkpoint.generator import checkpoint_generator
    from mllm_kd.model.generate import answer_file
    from mllm_kd.runtime.device import pick_device

    out = Path(out)
    questions = questions_of(records, where)
    answers = out.with_suffix(".answers.jsonl")
    source = _source(teacher, questions, max_new_tokens)
    try:
        same = json.loads(_source_path(out).read_text()) == source
    except (OSError, json.JSONDecodeError):
        same = False
    if not same:  # answers of another teacher, to other questions or of another length: start over
        answers.unlink(missing_ok=True)
        out.unlink(missing_ok=True)  # never left beside a source record it was not made from
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(_source_path(out), (json.dumps(source, indent=1) + "\n").encode())
    if set(_answered(answers)) != {q["question_id"] for q in questions}:  # else nothing to generate
        gen = checkpoint_generator(teacher, device or pick_device(), max_new_tokens=max_new_tokens)
        answer_file(
            gen, questions, image_folder, answers, "teacher", batch_size=batch_size, progress=progress
        )
    by_id = _answered(answers)
    labelled = []
    for q, rec in zip(questions, records):
        if q["question_id"] not in by_id:
            raise DataError(f"{answers}: no teacher answer for sample {q['question_id']!r}")
        turn = {"from": "gpt", "value": by_id[q["question_id"]]}
        labelled.append({**rec, "conversations": [rec["conversations"][0], turn]})
    atomic_write_bytes(out, (json.dumps(labelled, indent=1) + "\n").encode())
    empty = sum(not by_id[q["question_id"]].strip() for q in questions)
    log.info("the teacher answered %d questions (%d answers empty) -> %s", len(labelled), empty, out)
    return out


def _answered(answers: Path) -> dict[str, str]:
    """question id -> the teacher's answer, from the complete lines of ``answers`` (none when it is absent)."""
    out = {}
    if not answers.is_file():
        return out
    for line in answers.read_text().splitlines():
        try:
            row = json.loads(line)
            out[str(row["question_id"])] = row["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a torn last line: answer_file rewrites it
    return out


def read_slice(path: Path, start: int, count: int | None) -> list[dict]:
    """Records ``start`` .. ``start + count`` of a LLaVA JSON list (errors name the file)."""
    try:
        records = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable JSON file: {e}") from e
    if not isinstance(records, list):
        raise DataError(f"{path} must hold a JSON list of samples")
    end = len(records) if count is None else start + count
    if start < 0 or end > len(records) or end <= start:
        raise DataError(f"{path} holds {len(records)} samples: records {start}..{end} are not there")
    return records[start:end]


def main(argv: list[str] | None = None) -> int:
    from mllm_kd.cli import setup_process
    from mllm_kd.runtime.device import pick_device

    p = ArgumentParser(prog="python -m mllm_kd.teacher.label", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="the teacher's checkpoint (a finished stage's final/)")
    p.add_argument("--data", required=True, type=Path, help="LLaVA JSON records, one question each")
    p.add_argument(
        "--images", type=Path, help="the folder the image paths are relative to (default: --data's)"
    )
    p.add_argument("--start", type=int, default=0, help="the first record to answer (default 0)")
    p.add_argument("--count", type=int, help="how many records (default: to the end)")
    p.add_argument("--out", required=True, type=Path, help="the LLaVA JSON file to write")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    args = p.parse_args(argv)
    setup_process()
    try:
        records = read_slice(args.data, args.start, args.count)
        label_records(
            args.teacher,
            records,
            args.images or args.data.parent,
            args.out,
            device=pick_device(args.device),
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            where=str(args.data),
        )
    except MllmKdError as e:
        return exit_code(e)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
