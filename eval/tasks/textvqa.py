"""TextVQA: VQA soft accuracy as the M4C/MMF evaluator LLaVA uses computes it (EvalAI processing on the
prediction *and* on all ten human answers).

``--annotations``: the official ``TextVQA_0.5.1_val.json``, ``{"data": [{question_id, question, image_id,
answers: [10 str], ...}]}``. A prediction's ``question_id`` is the official question id, or, as in LLaVA's
``llava_textvqa_val_v051_ocr.jsonl``, the ``image_id``, the question then being read from the prompt's first
line (LLaVA eval_textvqa.py's ``prompt_processor``).
"""

from __future__ import annotations

import re
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
    pct,
    qid_key,
    read_json,
    unknown_question,
)
from mllm_kd.eval.normalize import evalai_normalize, soft_accuracy


@dataclass
class TextVQAData:
    source: Path
    answers: dict[str, list[str]]  # question_id -> processed human answers
    by_image: dict[tuple[str, str], str]  # (image_id, lower-cased question) -> question_id


def prompt_question(prompt: str) -> str:
    """The question in a LLaVA TextVQA prompt (the line that is not OCR tokens or the instruction)."""
    prompt = prompt.removeprefix("<image>").strip()
    m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
    if prompt.startswith("OCR tokens: ") and m:
        return m.group(1).lower()
    lines = [ln for ln in prompt.split("\n") if not ln.startswith("Reference OCR token:")]
    return (lines[0] if lines else "").lower()


class TextVQATask(Task):
    name = "textvqa"

    def _data(self, path: Path) -> list[dict]:
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise DataError(f"{path}: expected the TextVQA {{'data': [...]}} layout")
        return data["data"]

    def load(self, path: Path, split: str | None = None) -> TextVQAData:
        self.check_split(split)
        data = self._data(path)
        where = [f"{path}: data[{i}]" for i in range(len(data))]
        out = TextVQAData(path, {}, {})
        out.answers = index_unique(  # a question_id twice is an error naming both items
            (
                get_field(item, "question_id", w),
                [evalai_normalize(a) for a in get_field(item, "answers", w)],
                w,
            )
            for item, w in zip(data, where)
        )
        for item in data:
            qid = qid_key(item["question_id"])
            out.by_image[(str(item.get("image_id")), str(item.get("question", "")).lower())] = qid
        return out

    def questions(self, path: Path, split: str | None = None) -> list[Question]:
        self.check_split(split)
        out = []
        for i, item in enumerate(self._data(path)):
            where = f"{path}: data[{i}]"
            # Only some releases carry OCR tokens (LLaVA's llava_textvqa_val_v051_ocr.jsonl adds them).
            ocr = item.get("ocr_tokens")
            ref = f"\nReference OCR token: {', '.join(ocr)}" if ocr else ""
            prompt = f"{get_field(item, 'question', where)}{ref}\n{SHORT_ANSWER}"
            out.append(
                Question(
                    get_field(item, "question_id", where), f"{get_field(item, 'image_id', where)}.jpg", prompt
                )
            )
        return out

    def score(self, predictions: list[Prediction], annotations: TextVQAData) -> dict[str, Any]:
        scores = []
        seen: dict[str, Prediction] = {}
        for p in predictions:
            qid = qid_key(p.question_id)
            if qid not in annotations.answers:  # LLaVA style: question_id is the image id
                qid = annotations.by_image.get((str(p.question_id), prompt_question(p.prompt)), "")
            if qid not in annotations.answers:
                raise unknown_question(p, annotations.source)
            if qid in seen:
                raise DataError(f"{p.where}: answers question {qid} again (first at {seen[qid].where})")
            seen[qid] = p
            scores.append(soft_accuracy(evalai_normalize(p.text), annotations.answers[qid]))
        return {
            "accuracy": pct(sum(scores) / len(scores)),
            "n": len(scores),
            "missing": len(annotations.answers) - len(seen),
        }
