"""VizWiz-VQA: the official VizWiz accuracy, by answer type, and the upload file (``--submission``).

``--annotations``: the official ``val.json`` or ``test.json``, a list of ``{image, question, answers:
[{answer, answer_confidence}], answer_type, answerable}`` (test has no answers: ``--submission`` only).
A prediction's ``question_id`` is the image file name (``VizWiz_val_00000000.jpg``, what :meth:`questions`
emits; ``.jpg`` may be left off) or, as an int, the 0-based position in the file. Note: VizWiz's own
evaluation compares the processed prediction with the *raw* human answers (no processPunctuation on them,
unlike vqaEval.py), and its upload rows are ``{"image", "answer"}``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mllm_kd.errors import DataError
from mllm_kd.eval.core import SHORT_ANSWER, Prediction, Question, Task, get_field, read_json, unknown_question
from mllm_kd.eval.tasks.vqav2 import VQAData, soft_score, write_upload

UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."


class VizWizTask(Task):
    name = "vizwiz"

    def _items(self, path: Path) -> list[dict]:
        data = read_json(path)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected the VizWiz list of {{image, question, answers, ...}}")
        return data

    def load(self, path: Path, split: str | None = None) -> VQAData:
        self.check_split(split)
        ids, answers = [], {}
        for i, item in enumerate(self._items(path)):
            where = f"{path}: item {i}"
            image = str(get_field(item, "image", where))
            ids.append(image)
            if item.get("answers"):
                gts = [str(get_field(a, "answer", where)) for a in item["answers"]]
                answers[image] = (gts, str(item.get("answer_type", "other")))
        return VQAData(path, ids, answers)

    def questions(self, path: Path, split: str | None = None) -> list[Question]:
        self.check_split(split)
        out = []
        for i, item in enumerate(self._items(path)):
            where = f"{path}: item {i}"
            image = str(get_field(item, "image", where))
            out.append(
                Question(
                    image, image, f"{get_field(item, 'question', where)}\n{UNANSWERABLE}\n{SHORT_ANSWER}"
                )
            )
        return out

    def _resolve(self, preds: list[Prediction], data: VQAData) -> list[Prediction]:
        """Rewrite each question_id to its image file name."""
        known = set(data.ids)
        out = []
        for p in preds:
            key = str(p.question_id)
            if key not in known and key + ".jpg" in known:
                key += ".jpg"
            elif key not in known and isinstance(p.question_id, int) and 0 <= p.question_id < len(data.ids):
                key = data.ids[p.question_id]
            if key not in known:
                raise unknown_question(p, data.source)
            out.append(dataclasses.replace(p, question_id=key))
        return out

    def has_answers(self, annotations: VQAData) -> bool:
        return bool(annotations.answers)

    def score(self, predictions: list[Prediction], annotations: VQAData) -> dict[str, Any]:
        return soft_score(self._resolve(predictions, annotations), annotations)

    def write_submission(
        self, predictions: list[Prediction], annotations: VQAData, path: Path
    ) -> dict[str, Any]:
        return write_upload(self._resolve(predictions, annotations), annotations, path, "image")
