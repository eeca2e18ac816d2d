"""easy-VQA (our demo benchmark): exact match of the :func:`final_answer` after :func:`simple_normalize`
(lower-case, punctuation and articles dropped), overall and per question type.

``--annotations``: a JSON object ``{question_id (str): {"answer": str, "type": "shape"|"color"|"yes/no",
"question"?: str, "image"?: str}}``, or JSONL / a JSON list of ``{question_id, answer, type, question?,
image?}``. ``question`` and ``image`` are needed only to build prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm_kd.errors import DataError
from mllm_kd.eval.core import (
    SHORT_ANSWER,
    Prediction,
    Question,
    Task,
    get_field,
    index_unique,
    iter_jsonl,
    mean_by,
    no_repeated_keys,
    pct,
    qid_key,
    read_text,
    unique_by_qid,
    unknown_question,
)
from mllm_kd.eval.normalize import simple_normalize


def final_answer(text: str) -> str:
    """The answer a prediction gives: the text after its last comma, so that a described answer
    ("blue rectangle, yes", the format ``data_prep.easyvqa --describe-yes-no`` trains) is scored on
    "yes"; an answer without a comma is itself."""
    return text.rpartition(",")[2].strip()


@dataclass
class EasyVQAData:
    source: Path
    items: dict[str, dict]  # question id -> {"answer", "type", ...}


class EasyVQATask(Task):
    name = "easyvqa"

    def load(self, path: Path, split: str | None = None) -> EasyVQAData:
        self.check_split(split)
        text = read_text(path)
        try:
            data: Any = json.loads(text, object_pairs_hook=lambda pairs: no_repeated_keys(pairs, path))
            where = [f"{path}: record {i}" for i in range(len(data))] if isinstance(data, list) else []
        except json.JSONDecodeError:
            lines = list(iter_jsonl(path))  # JSONL; a bad line is reported with its number
            data, where = [obj for _, obj in lines], [f"{path}:{n}" for n, _ in lines]
        if isinstance(data, dict) and "question_id" in data:  # a one-line JSONL file
            data, where = [data], [f"{path}:1"]
        if isinstance(data, list):
            data = index_unique((get_field(r, "question_id", w), r, w) for r, w in zip(data, where))
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a JSON object of question_id -> {{answer, type}}, or JSONL")
        if not data:
            raise DataError(f"{path}: no annotations")
        for qid, item in data.items():
            get_field(item, "answer", f"{path}: question {qid}")
            if not isinstance(item["answer"], (str, int, float)) or isinstance(item["answer"], bool):
                raise DataError(
                    f"{path}: question {qid}: 'answer' must be a string, got {item['answer']!r:.60}"
                )
        return EasyVQAData(path, {qid_key(k): v for k, v in data.items()})

    def questions(self, path: Path, split: str | None = None) -> list[Question]:
        out = []
        for qid, item in self.load(path, split).items.items():
            where = f"{path}: question {qid} (prompts need 'question' and 'image')"
            prompt = f"{get_field(item, 'question', where)}\n{SHORT_ANSWER}"
            out.append(Question(qid, str(get_field(item, "image", where)), prompt))
        return out

    def score(self, predictions: list[Prediction], annotations: EasyVQAData) -> dict[str, Any]:
        pairs = []
        for p in unique_by_qid(predictions).values():
            item = annotations.items.get(qid_key(p.question_id))
            if item is None:
                raise unknown_question(p, annotations.source)
            ok = simple_normalize(final_answer(p.text)) == simple_normalize(str(item["answer"]))
            pairs.append((str(item.get("type", "unknown")), float(ok)))
        return {
            "accuracy": pct(sum(s for _, s in pairs) / len(pairs)),
            "by_type": mean_by(pairs),
            "n": len(pairs),
            "missing": len(annotations.items) - len(pairs),
        }
