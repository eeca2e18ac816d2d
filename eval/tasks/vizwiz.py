"""VizWiz-VQA: the accuracy the VizWiz evaluation server gives, by answer type, and the upload file.

Which "official" (see docs/evaluation.md): LLaVA's VizWiz number is a test-dev server number; its upload
(``scripts/convert_vizwiz_for_submission.py``) passes every answer through the EvalAI answer processor
(:func:`evalai_normalize`: "red,blue" -> "redblue", "dog's" -> "dog 's"), and the server scores it with
VizWiz's own ``vqaEval.py`` (VizWiz-VQA API, vizwiz.org): the prediction is normalised again with VizWiz's
contraction table, whose expansions mostly use a curly apostrophe (``dont`` -> ``don’t``), and compared with
the *raw* human answers (no processing at all, unlike VQAv2), ten-choose-nine by position. ``accuracy`` and
``by_answer_type`` follow that path on the val annotations, rounded as that Python 3 code rounds;
``variants`` also gives VizWiz's ``vqaEval.py`` on the raw answers (no EvalAI step). Every question of the
file is scored; a missing answer counts as "" (LLaVA's converter refuses such a file, VizWiz's code too).
The unanswerability metrics (they need an answerability score per question) and caption metrics that
VizWiz's script can also compute are not produced.

``--annotations``: the official ``val.json`` or ``test.json``, a list of ``{image, question, answers:
[{answer, answer_confidence}], answer_type, answerable}`` (test has no answers: ``--submission`` only).
A prediction's ``question_id`` is the image file name (``VizWiz_val_00000000.jpg``, what :meth:`questions`
emits; ``.jpg`` may be left off) or, as an int, the 0-based position in the file. Upload rows are
``{"image", "answer"}``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mllm_kd.errors import DataError
from mllm_kd.eval.core import (
    SHORT_ANSWER,
    Prediction,
    Question,
    Task,
    get_field,
    official_pct,
    read_json,
    unknown_question,
)
from mllm_kd.eval.normalize import evalai_normalize, soft_accuracy, vizwiz_normalize
from mllm_kd.eval.tasks.vqav2 import VQAData, VQAItem, answered, by_type, write_upload


def vizwiz_accuracy(pred: str, gts: list[str]) -> float:
    """VizWiz vqaEval.py on one answer: the normalised prediction against the raw human answers."""
    return soft_accuracy(vizwiz_normalize(pred), gts)


def vizwiz_score(preds: list[Prediction], data: VQAData) -> dict[str, Any]:
    by_qid = answered(preds, data)
    keys = [k for k in data.ids if k in data.items]
    texts = [by_qid[k].text if k in by_qid else "" for k in keys]
    server = [vizwiz_accuracy(evalai_normalize(t), data.items[k].answers) for k, t in zip(keys, texts)]
    raw = [vizwiz_accuracy(t, data.items[k].answers) for k, t in zip(keys, texts)]
    return {
        "accuracy": official_pct(sum(server), len(server)),
        "by_answer_type": by_type([(data.items[k].answer_type, a) for k, a in zip(keys, server)], py2=False),
        "variants": {
            "evalai+vizwiz": official_pct(sum(server), len(server)),
            "vizwiz": official_pct(sum(raw), len(raw)),
        },
        "n": len(keys),
        "missing": len(keys) - len(by_qid),
    }


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
        ids, items, first = [], {}, {}
        for i, item in enumerate(self._items(path)):
            where = f"{path}: item {i}"
            image = str(get_field(item, "image", where))
            if image in first:  # the image file name is VizWiz's question id
                raise DataError(f"{where}: image {image!r} appears twice (first at {first[image]})")
            ids.append(image)
            first[image] = where
            if item.get("answers"):
                gts = [get_field(a, "answer", f"{where}.answers") for a in item["answers"]]
                if not all(isinstance(g, str) for g in gts):
                    raise DataError(f"{where}: every human answer must be a string")
                items[image] = VQAItem(gts, str(get_field(item, "answer_type", where)))
        return VQAData(path, ids, items)

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
        return bool(annotations.items)

    def score(self, predictions: list[Prediction], annotations: VQAData) -> dict[str, Any]:
        return vizwiz_score(self._resolve(predictions, annotations), annotations)

    def write_submission(
        self, predictions: list[Prediction], annotations: VQAData, path: Path
    ) -> dict[str, Any]:
        return write_upload(self._resolve(predictions, annotations), annotations, path, "image")
