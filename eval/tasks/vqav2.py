"""VQAv2: the accuracy the VQA evaluation server gives, by answer type and question type, and the EvalAI
test-dev upload file.

Which "official" (see docs/evaluation.md): the published VQAv2 numbers (LLaVA's among them) are test-dev
numbers from the EvalAI server, whose upload LLaVA writes with ``scripts/convert_vqav2_for_submission.py``:
every answer goes through the EvalAI answer processor first (:func:`evalai_normalize`), and an unanswered
question is uploaded as "". The server scores that with the current GT-Vision-Lab/VQA ``vqaEval.py`` (2021
fix: answers are normalised only when the ten human answers disagree). ``accuracy`` and its breakdowns are
that path on the val annotations: every question of the file is scored, a missing answer as "". ``variants``
adds the two other versions a reader may meet: the current ``vqaEval.py`` run locally on the raw answers
(its demo script refuses a file that misses questions; here they count as "") and the 2017 ``vqaEval.py``
(always normalises the answer, the human answers only by punctuation). Percentages are rounded as that Python 2 code rounds (ties away from zero).

``--annotations``: the official ``v2_mscoco_val2014_annotations.json`` (scored), a questions file
``v2_OpenEnded_mscoco_{val2014,test-dev2015,test2015}_questions.json`` (no answers: ``--submission`` only),
or a folder holding them (the annotations file wins). Question ids are the official integer ids; images
are ``COCO_{val2014|test2015}_{image_id:012d}.jpg`` in the COCO folder of that name.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
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
    index_unique,
    official_pct,
    qid_key,
    read_json,
    unique_by_qid,
    unknown_question,
    write_json,
)
from mllm_kd.eval.normalize import evalai_normalize, vqa_accuracy, vqa_accuracy_2017


@dataclass
class VQAItem:
    """One question's human answers as the file has them (raw), its types, and ``identity``: what tells
    the answer records apart besides their text (None: all differ, as VQAv2's answer_id 1..10 do)."""

    answers: list[str]
    answer_type: str
    question_type: str = ""
    identity: list[Hashable] | None = None


@dataclass
class VQAData:
    """``ids``: every question in file order (the upload's rows, the scoring order); ``items``: qid -> item
    (empty for a questions file or a test split)."""

    source: Path
    ids: list[QuestionId]
    items: dict[str, VQAItem]


def answered(preds: list[Prediction], data: VQAData) -> dict[str, Prediction]:
    """Predictions by question id; an unknown id is an error naming the answer line."""
    by_qid = unique_by_qid(preds)
    for k, p in by_qid.items():
        if k not in data.items:
            raise unknown_question(p, data.source)
    return by_qid


def by_type(rows: list[tuple[str, float]], py2: bool) -> dict[str, float]:
    """(type, accuracy) in scoring order -> {type: percent}, summed in that order as the official code does."""
    groups: dict[str, list[float]] = {}
    for t, acc in rows:
        groups.setdefault(t, []).append(acc)
    return {t: official_pct(sum(v), len(v), py2) for t, v in sorted(groups.items())}


VQAV2_VARIANTS: dict[str, Callable[[str, VQAItem], float]] = {
    # LLaVA's upload (EvalAI answer processor) scored by the current vqaEval.py: the default
    "evalai+vqaeval_2021": lambda text, it: vqa_accuracy(evalai_normalize(text), it.answers, it.identity),
    "vqaeval_2021": lambda text, it: vqa_accuracy(text, it.answers, it.identity),
    "vqaeval_2017": lambda text, it: vqa_accuracy_2017(text, it.answers),
}


def vqav2_score(preds: list[Prediction], data: VQAData) -> dict[str, Any]:
    by_qid = answered(preds, data)
    keys = [qid_key(q) for q in data.ids if qid_key(q) in data.items]
    texts = [by_qid[k].text if k in by_qid else "" for k in keys]
    variants = {}
    for name, acc_fn in VQAV2_VARIANTS.items():
        accs = [acc_fn(t, data.items[k]) for k, t in zip(keys, texts, strict=True)]
        variants[name] = official_pct(sum(accs), len(accs), py2=True)
        if name == "evalai+vqaeval_2021":
            main = accs
    return {
        "accuracy": variants["evalai+vqaeval_2021"],
        "by_answer_type": by_type([(data.items[k].answer_type, a) for k, a in zip(keys, main)], py2=True),
        "by_question_type": by_type([(data.items[k].question_type, a) for k, a in zip(keys, main)], py2=True),
        "variants": variants,
        "n": len(keys),
        "missing": len(keys) - len(by_qid),
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


def record_identity(records: list[dict]) -> list[Hashable] | None:
    """What vqaEval.py's ``item != gtAnsDatum`` sees of each answer record besides its text; None when
    the records all differ anyway (then leave-one-out is by position)."""
    rest = [tuple(sorted((str(k), repr(v)) for k, v in r.items() if k != "answer")) for r in records]
    return None if len(set(rest)) == len(rest) else rest


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
            where = [f"{path}: annotations[{i}]" for i in range(len(data["annotations"]))]
            items = index_unique(  # a question_id twice is an error naming both records
                (get_field(a, "question_id", w), _vqa_item(a, w), w)
                for a, w in zip(data["annotations"], where)
            )
            return VQAData(path, [a["question_id"] for a in data["annotations"]], items)
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
        return bool(annotations.items)

    def score(self, predictions: list[Prediction], annotations: VQAData) -> dict[str, Any]:
        return vqav2_score(predictions, annotations)

    def write_submission(
        self, predictions: list[Prediction], annotations: VQAData, path: Path
    ) -> dict[str, Any]:
        return write_upload(predictions, annotations, path, "question_id")


def _vqa_item(a: Any, where: str) -> VQAItem:
    """One record of a VQA annotations file: the ten human answers and the answer / question types."""
    records = get_field(a, "answers", where)
    if not isinstance(records, list) or not records:
        raise DataError(f"{where}: 'answers' must be a non-empty list")
    gts = [get_field(x, "answer", f"{where}.answers") for x in records]
    if not all(isinstance(g, str) for g in gts):
        raise DataError(f"{where}: every human answer must be a string")
    return VQAItem(
        gts,
        str(get_field(a, "answer_type", where)),
        str(get_field(a, "question_type", where)),
        record_identity(records),
    )
