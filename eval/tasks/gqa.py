"""GQA: exact match after LLaVA's normalisation (convert_gqa_for_eval.py: drop trailing periods, lower-case),
as the official GQA ``eval.py`` scores it: accuracy over balanced questions, split into binary (structural
type other than "query") and open questions, and by structural type.

``--annotations``: the official balanced question file, e.g. ``testdev_balanced_questions.json``, a dict
``question id -> {imageId, question, answer, isBalanced, types: {structural, semantic, ...}, ...}``.
"""

from __future__ import annotations

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
    mean_by,
    pct,
    qid_key,
    ratio,
    read_json,
    unique_by_qid,
    unknown_question,
)


@dataclass
class GQAData:
    source: Path
    questions: dict[str, dict]


def gqa_normalize(text: str) -> str:
    """LLaVA's ``text.rstrip('.').lower()`` (on the stripped generation, as LLaVA's outputs are)."""
    return text.strip().rstrip(".").lower()


class GQATask(Task):
    name = "gqa"

    def load(self, path: Path, split: str | None = None) -> GQAData:
        self.check_split(split)
        data = read_json(path)
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected the GQA dict of question id -> question")
        return GQAData(path, {qid_key(k): v for k, v in data.items()})

    def questions(self, path: Path, split: str | None = None) -> list[Question]:
        data = self.load(path, split)
        out = []
        for qid, q in data.questions.items():
            where = f"{path}: question {qid}"
            image = f"{get_field(q, 'imageId', where)}.jpg"
            out.append(Question(qid, image, f"{get_field(q, 'question', where)}\n{SHORT_ANSWER}"))
        return out

    def score(self, predictions: list[Prediction], annotations: GQAData) -> dict[str, Any]:
        rows = []  # (structural type, correct)
        for p in unique_by_qid(predictions).values():
            q = annotations.questions.get(qid_key(p.question_id))
            if q is None:
                raise unknown_question(p, annotations.source)
            if not q.get("isBalanced", True):  # the official accuracy counts balanced questions only
                continue
            gold = get_field(q, "answer", f"{annotations.source}: question {p.question_id}")
            rows.append(
                (
                    str((q.get("types") or {}).get("structural", "unknown")),
                    float(gqa_normalize(p.text) == gold),
                )
            )
        binary = [c for t, c in rows if t != "query"]
        open_ = [c for t, c in rows if t == "query"]
        return {
            "accuracy": pct(ratio(sum(c for _, c in rows), len(rows))),
            "binary": pct(ratio(sum(binary), len(binary))),
            "open": pct(ratio(sum(open_), len(open_))),
            "by_structural_type": mean_by(rows),
            "n": len(rows),
            "missing": len(annotations.questions) - len(predictions),
        }
