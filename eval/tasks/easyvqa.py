"""easy-VQA (our demo benchmark): exact match after :func:`simple_normalize` (lower-case, punctuation and
articles dropped), overall and per question type.

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
    iter_jsonl,
    mean_by,
    pct,
    qid_key,
    require_file,
    unique_by_qid,
    unknown_question,
)
from mllm_kd.eval.normalize import simple_normalize


@dataclass
class EasyVQAData:
    source: Path
    items: dict[str, dict]  # question id -> {"answer", "type", ...}


class EasyVQATask(Task):
    name = "easyvqa"

    def load(self, path: Path, split: str | None = None) -> EasyVQAData:
        self.check_split(split)
        text = require_file(path, "annotation file").read_text(encoding="utf-8")
        try:
            data: Any = json.loads(text)
        except json.JSONDecodeError:
            data = [obj for _, obj in iter_jsonl(path)]  # JSONL; a bad line is reported with its number
        if isinstance(data, dict) and "question_id" in data:  # a one-line JSONL file
            data = [data]
        if isinstance(data, list):
            data = {
                qid_key(get_field(r, "question_id", f"{path}: record {i}")): r for i, r in enumerate(data)
            }
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a JSON object of question_id -> {{answer, type}}, or JSONL")
        for qid, item in data.items():
            get_field(item, "answer", f"{path}: question {qid}")
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
            ok = simple_normalize(p.text) == simple_normalize(str(item["answer"]))
            pairs.append((str(item.get("type", "unknown")), float(ok)))
        return {
            "accuracy": pct(sum(s for _, s in pairs) / len(pairs)),
            "by_type": mean_by(pairs),
            "n": len(pairs),
            "missing": len(annotations.items) - len(pairs),
        }
