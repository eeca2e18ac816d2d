"""VQAv2: the official VQA accuracy (GT-Vision-Lab ``vqaEval.py``) and the EvalAI test-dev upload file.

``--annotations``: the official ``v2_mscoco_val2014_annotations.json`` (scored), a questions file
``v2_OpenEnded_mscoco_{val2014,test-dev2015,test2015}_questions.json`` (no answers: ``--submission`` only),
or a folder holding them (the annotations file wins). Question ids are the official integer ids; images
are ``COCO_{val2014|test2015}_{image_id:012d}.jpg`` in the COCO folder of that name.
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
    QuestionId,
    Task,
    find_one,
    get_field,
    mean_by,
    pct,
    qid_key,
    read_json,
    unique_by_qid,
    unknown_question,
    write_json,
)
from mllm_kd.eval.normalize import evalai_normalize, process_punctuation, soft_accuracy, vqa_normalize


@dataclass
class VQAData:
    """``ids``: every question in file order (the upload's rows); ``answers``: qid -> (humans, answer type)."""

    source: Path
    ids: list[QuestionId]
    answers: dict[str, tuple[list[str], str]]


def soft_score(preds: list[Prediction], data: VQAData) -> dict[str, Any]:
    """Official VQA accuracy of each prediction, overall and by answer type (VQAv2 and VizWiz)."""
    pairs = []
    for p in unique_by_qid(preds).values():
        item = data.answers.get(qid_key(p.question_id))
        if item is None:
            raise unknown_question(p, data.source)
        pairs.append((item[1], soft_accuracy(vqa_normalize(p.text), item[0])))
    overall = pct(sum(s for _, s in pairs) / len(pairs))
    return {
        "accuracy": overall,
        "by_answer_type": mean_by(pairs),
        "n": len(pairs),
        "missing": len(data.answers) - len(pairs),
    }


def write_upload(preds: list[Prediction], data: VQAData, path: Path, id_field: str) -> dict[str, Any]:
    """One row per question of the split, answers through the EvalAI processor as LLaVA's
    convert_*_for_submission.py does; unanswered questions get "" (LLaVA does the same for VQAv2)."""
    by_qid = unique_by_qid(preds)
    known = {qid_key(q) for q in data.ids}
    for p in by_qid.values():
        if qid_key(p.question_id) not in known:
            raise unknown_question(p, data.source)
    rows = [
        {id_field: q, "answer": evalai_normalize(by_qid[qid_key(q)].text) if qid_key(q) in by_qid else ""}
        for q in data.ids
    ]
    write_json(path, rows)
    return {
        "submission": str(path),
        "submission_rows": len(rows),
        "submission_missing": len(rows) - len(by_qid),
    }


class VQAv2Task(Task):
    name = "vqav2"

    def _file(self, path: Path, want_questions: bool = False) -> Path:
        if not path.is_dir():
            return path
        ann = None if want_questions else find_one(path, ("*_annotations.json",), "annotations")
        found = ann or find_one(path, ("*_questions.json",), "questions")
        if found is None:
            raise DataError(f"{path}: no *_annotations.json or *_questions.json file")
        return found

    def load(self, path: Path, split: str | None = None) -> VQAData:
        self.check_split(split)
        path = self._file(path)
        data = read_json(path)
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            answers: dict[str, tuple[list[str], str]] = {}
            for i, a in enumerate(data["annotations"]):
                where = f"{path}: annotations[{i}]"
                gts = [get_field(x, "answer", where) for x in get_field(a, "answers", where)]
                # vqaEval.py touches the (already clean) human answers only when they disagree, and then
                # only with processPunctuation.
                if len(set(gts)) > 1:
                    gts = [process_punctuation(g) for g in gts]
                answers[qid_key(get_field(a, "question_id", where))] = (
                    gts,
                    str(a.get("answer_type", "other")),
                )
            return VQAData(path, [a["question_id"] for a in data["annotations"]], answers)
        if isinstance(data, dict) and isinstance(data.get("questions"), list):
            return VQAData(
                path, [get_field(q, "question_id", f"{path}: questions") for q in data["questions"]], {}
            )
        raise DataError(
            f"{path}: neither a VQA annotations file ('annotations') nor a questions file ('questions')"
        )

    def questions(self, path: Path, split: str | None = None) -> list[Question]:
        self.check_split(split)
        path = self._file(path, want_questions=True)
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
            raise DataError(f"{path}: not a VQA questions file (no 'questions' list)")
        subtype = str(data.get("data_subtype", "val2014"))
        folder = "test2015" if subtype.startswith("test") else subtype  # test-dev images live in test2015
        out = []
        for i, q in enumerate(data["questions"]):
            where = f"{path}: questions[{i}]"
            image = f"COCO_{folder}_{int(get_field(q, 'image_id', where)):012d}.jpg"
            prompt = f"{get_field(q, 'question', where)}\n{SHORT_ANSWER}"
            out.append(Question(get_field(q, "question_id", where), image, prompt))
        return out

    def has_answers(self, annotations: VQAData) -> bool:
        return bool(annotations.answers)

    def score(self, predictions: list[Prediction], annotations: VQAData) -> dict[str, Any]:
        return soft_score(predictions, annotations)

    def write_submission(
        self, predictions: list[Prediction], annotations: VQAData, path: Path
    ) -> dict[str, Any]:
        return write_upload(predictions, annotations, path, "question_id")
