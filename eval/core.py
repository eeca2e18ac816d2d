"""What every benchmark task shares: prediction and question records, file readers, the Task base class.

A *prediction* is one line of a LLaVA answers file (JSONL)::

    {"question_id": ..., "prompt": str, "text": str, "answer_id": str, "model_id": str, "metadata": {}}

Other top-level keys (LLaVA's MMBench answers add ``round_id``, ``options``, ``option_char``) are kept in
:attr:`Prediction.extra`. A *question* is what generation needs: an id, an image and the prompt text.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, ClassVar

from mllm_kd.atomic import atomic_write_bytes
from mllm_kd.errors import ConfigError, DataError

# LLaVA-1.5's instruction suffixes (llava/eval/*.jsonl question files and model_vqa_*.py).
SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
QuestionId = int | str


@dataclass
class Prediction:
    """One answer line. ``question_id`` is kept as written (int or str); compare via :func:`qid_key`."""

    question_id: QuestionId
    text: str
    prompt: str = ""
    model_id: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # "file:line", for error messages

    def get(self, key: str, default: Any = None) -> Any:
        """A field LLaVA may put at top level or we may put in ``metadata`` (top level wins)."""
        return self.extra.get(key, self.metadata.get(key, default))


@dataclass
class Question:
    """One generation request.

    ``image`` is a path relative to the benchmark's image folder (None for text-only questions or when the
    image is embedded, see ``image_b64``). ``prompt`` is the user text *without* the ``<image>`` token.
    ``extra`` holds keys the answer line must carry at top level for scoring (MMBench's ``round_id``,
    ``options``, ``option_char``, as LLaVA's model_vqa_mmbench.py writes them).
    """

    question_id: QuestionId
    image: str | None
    prompt: str
    image_b64: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def qid_key(qid: Any) -> str:
    """Question ids compare as strings: LLaVA writes GQA/ScienceQA ids as str, VQAv2's as int."""
    return str(qid)


def pct(x: float) -> float:
    """A fraction as a percentage rounded to 2 decimals (half to even on the exact binary value: what
    Python 3's ``round`` and ``"{:.2f}".format`` do, as in LLaVA's, ScienceQA's and GQA's scripts)."""
    return round(100.0 * x, 2)


def round_half_away(x: float, digits: int = 2) -> float:
    """Python 2's ``round``: the exact binary value rounded, ties away from zero (0.125 -> 0.13, where
    Python 3 gives 0.12). The VQA evaluation (GT-Vision-Lab/VQA) is Python 2 code."""
    return float(Decimal(x).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def official_pct(total: float, n: int, py2: bool = False) -> float:
    """``round(100 * float(total) / n, 2)`` as vqaEval.py writes it (multiplied before dividing, which can
    differ from 100 * (total / n) in the last bit); ``py2`` for Python 2's rounding. 0 for n = 0."""
    if not n:
        return 0.0
    x = 100 * float(total) / n
    return round_half_away(x) if py2 else round(x, 2)


def ratio(num: float, den: float) -> float:
    """num/den, 0 for an empty denominator (an empty subset scores 0 rather than crashing)."""
    return num / den if den else 0.0


def mean_by(pairs: list[tuple[str, float]]) -> dict[str, float]:
    """(group, score in [0, 1]) pairs -> {group: mean score in percent}, groups sorted by name."""
    sums: dict[str, list[float]] = {}
    for group, s in pairs:
        sums.setdefault(group, []).append(s)
    return {g: pct(sum(v) / len(v)) for g, v in sorted(sums.items())}


# ---------------------------------------------------------------------------------------------- files
def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    return path


def read_text(path: Path, what: str = "annotation file") -> str:
    """A UTF-8 text file's contents; a missing file or one that is not UTF-8 is a :class:`DataError`."""
    require_file(path, what)
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def read_json(path: Path, what: str = "annotation file") -> Any:
    """Load a JSON file; a missing or invalid file, or a key written twice in one object, is a
    :class:`DataError` naming it."""
    text = read_text(path, what)
    try:
        return json.loads(text, object_pairs_hook=lambda pairs: no_repeated_keys(pairs, path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e


def no_repeated_keys(pairs: list[tuple[str, Any]], path: Path) -> dict:
    """A JSON object's pairs -> dict; a key written twice (json.loads would keep the last) is a DataError."""
    out = dict(pairs)
    if len(out) < len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise DataError(
            f"{path}: key {twice!r} appears twice in one JSON object (a question_id given twice?)"
        )
    return out


def iter_jsonl(path: Path, what: str = "annotation file") -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a bad line is a DataError naming file:line."""
    for n, line in enumerate(read_text(path, what).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        yield n, obj


def find_one(folder: Path, patterns: tuple[str, ...], what: str) -> Path | None:
    """The single file in ``folder`` matching one of ``patterns`` (None if none; an error if several)."""
    hits = sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file()})
    if len(hits) > 1:
        names = ", ".join(h.name for h in hits)
        raise DataError(f"{folder}: several {what} files ({names}); pass the one you mean")
    return hits[0] if hits else None


def get_field(obj: Any, key: str, where: str) -> Any:
    """``obj[key]``, or a DataError naming ``where`` and the missing key."""
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    return obj[key]


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON, atomically: ``path`` is the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(obj).encode("utf-8"))


def index_unique(items: Iterable[tuple[Any, Any, str]], what: str = "question_id") -> dict[str, Any]:
    """``{qid_key(id): value}`` from ``(id, value, where)`` triples; an id seen twice is a DataError naming
    both places (a silent overwrite would score against whichever came last)."""
    out: dict[str, Any] = {}
    first: dict[str, str] = {}
    for qid, value, where in items:
        k = qid_key(qid)
        if k in out:
            raise DataError(f"{where}: {what} {qid!r} appears twice (first at {first[k]})")
        out[k], first[k] = value, where
    return out


def read_predictions(path: str | Path) -> list[Prediction]:
    """Read a LLaVA answers JSONL file. Each line needs ``question_id`` and a string ``text``."""
    path = Path(path)
    preds = []
    for n, obj in iter_jsonl(path, "predictions file"):
        where = f"{path}:{n}"
        if not isinstance(obj.get("question_id"), (int, str)) or isinstance(obj["question_id"], bool):
            raise DataError(f"{where}: 'question_id' must be an int or a string")
        if not isinstance(obj.get("text"), str):
            raise DataError(f"{where}: 'text' must be a string (question {obj['question_id']!r})")
        meta = obj.get("metadata") or {}
        if not isinstance(meta, dict):
            raise DataError(f"{where}: 'metadata' must be an object")
        known = {"question_id", "text", "prompt", "answer_id", "model_id", "metadata"}
        preds.append(
            Prediction(
                question_id=obj["question_id"],
                text=obj["text"],
                prompt=str(obj.get("prompt") or ""),
                model_id=str(obj.get("model_id") or ""),
                metadata=meta,
                extra={k: v for k, v in obj.items() if k not in known},
                where=where,
            )
        )
    if not preds:
        raise DataError(f"{path}: no predictions")
    return preds


def unknown_question(pred: Prediction, source: Path | str) -> DataError:
    """The error for a prediction whose question is not in the annotations."""
    return DataError(f"{pred.where}: question_id {pred.question_id!r} is not in the annotations ({source})")


def unique_by_qid(preds: list[Prediction]) -> dict[str, Prediction]:
    """Index predictions by question id; two answers to one question are an error, not a silent overwrite."""
    out: dict[str, Prediction] = {}
    for p in preds:
        k = qid_key(p.question_id)
        if k in out:
            raise DataError(
                f"{p.where}: question_id {p.question_id!r} answered twice (first at {out[k].where})"
            )
        out[k] = p
    return out


# ----------------------------------------------------------------------------------------------- task
class Task(ABC):
    """A benchmark: how to read its published annotation files, build prompts, and score answers.

    ``score`` returns a flat-ish JSON-able dict whose ``headline`` key names the main metric (a percentage
    unless ``headline_max`` says otherwise; the report scales it to 0-100 for the average).
    """

    name: ClassVar[str]
    headline: ClassVar[str] = "accuracy"
    headline_max: ClassVar[float] = 100.0
    has_splits: ClassVar[bool] = False  # whether load/questions understand ``split``

    @abstractmethod
    def load(self, path: Path, split: str | None = None) -> Any:
        """Read the annotations (a file or directory in the benchmark's published format)."""

    @abstractmethod
    def questions(self, path: Path, split: str | None = None) -> list[Question]:
        """The benchmark's questions with LLaVA-style prompts (for the generation step)."""

    @abstractmethod
    def score(self, predictions: list[Prediction], annotations: Any) -> dict[str, Any]:
        """Metrics for ``predictions`` against loaded ``annotations``."""

    def has_answers(self, annotations: Any) -> bool:
        """False for a test split read without ground truth (it can only be written as a submission)."""
        return True

    def write_submission(self, predictions: list[Prediction], annotations: Any, path: Path) -> dict[str, Any]:
        """Write the evaluation server's upload file; returns info to merge into the printed JSON."""
        raise ConfigError(f"task {self.name!r} has no submission format (--submission)")

    def check_split(self, split: str | None) -> None:
        if split is not None and not self.has_splits:
            raise ConfigError(f"task {self.name!r} takes no --split")
