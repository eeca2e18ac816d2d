"""GQA: the GQA ``eval.py`` (as LLaVA's evaluation instructions ship it, for testdev-balanced) on the answers
as LLaVA's ``scripts/convert_gqa_for_eval.py`` converts them (``text.rstrip('.').lower()``, nothing else:
" left" keeps its space).

Reported as eval.py prints it: accuracy over the balanced questions, binary (structural type other than
"query") and open, and accuracy with the question count per structural type, semantic type, number of
reasoning steps and number of words; the distribution score (chi-square of predicted vs gold answers per
global group, / 100, lower is better) where the questions carry groups. Validity and plausibility need the
tier's ``*_choices.json``: they are computed when it lies next to the questions file (the testdev-balanced
release has none, and eval.py then prints 0.00 for both; here they are null). Consistency (``--consistency``,
answers to all questions) and grounding (attention maps) are not computed.

Differences kept: eval.py refuses a predictions file that misses a balanced question; here it counts as
wrong and ``missing`` says how many (a complete file scores identically). An answer to a question not in the
file, or two answers to one, is an error here (eval.py ignores the first and keeps the last of the second).

``--annotations``: the official balanced question file, e.g. ``testdev_balanced_questions.json``, a dict
``question id -> {imageId, question, answer, isBalanced, types: {structural, semantic, detailed}, semantic:
[{operation, argument, ...}], groups: {global, local}, ...}``.
"""

from __future__ import annotations

from collections import defaultdict
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
    pct,
    qid_key,
    ratio,
    read_json,
    unique_by_qid,
    unknown_question,
)

# getStepsNum: semantic steps that do not add reasoning length (matched as substrings of "operation: argument")
NON_STEPS = ("exist", "query: name", "choose name")


@dataclass
class GQAData:
    source: Path
    questions: dict[str, dict]
    choices: dict[str, dict] | None = None  # the tier's {qid: {valid, plausible}}, when found


def gqa_normalize(text: str) -> str:
    """LLaVA's convert_gqa_for_eval.py: ``text.rstrip('.').lower()`` (no strip: " left" != "left")."""
    return text.rstrip(".").lower()


def steps_num(question: dict, where: str) -> int:
    """eval.py ``getStepsNum``: the semantic program's operations, less those that do not add length."""
    steps = [
        f"{get_field(c, 'operation', where)}: {get_field(c, 'argument', where)}"
        for c in get_field(question, "semantic", where)
    ]
    return sum(not any(o in s for o in NON_STEPS) for s in steps)


def belongs(answer: str | None, group: list[str], question: dict) -> bool:
    """eval.py ``belongs`` (validity/plausibility): "Common" questions accept color/material/shape."""
    if "Common" in (question.get("types") or {}).get("detailed", ""):
        group = ["color", "material", "shape"]
    return answer in group


def chi_square(gold: dict[str, dict[str, int]], predicted: dict[str, dict[str, int]]) -> float | None:
    """eval.py ``chiSquare``: per global group sum (o - e)^2 / e over the gold answers, averaged weighted by
    the group's size (None where no question has a global group: eval.py would divide by zero)."""
    total, overall = 0.0, 0
    for group, answers in gold.items():
        score = sum(float(predicted[group].get(a, 0) - e) ** 2 / e for a, e in answers.items())
        size = sum(answers.values())
        total += score * size
        overall += size
    return total / overall if overall else None


def acc_table(rows: dict[Any, list[float]]) -> dict[str, dict[str, float]]:
    """{key: [scores]} -> {key: {"accuracy": percent, "n": count}}, keys sorted as eval.py prints them."""
    return {str(k): {"accuracy": pct(ratio(sum(v), len(v))), "n": len(v)} for k, v in sorted(rows.items())}


class GQATask(Task):
    name = "gqa"

    def load(self, path: Path, split: str | None = None) -> GQAData:
        self.check_split(split)
        data = read_json(path)
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected the GQA dict of question id -> question")
        choices = None
        # the tier's choices file: testdev_balanced_questions.json -> testdev_balanced_choices.json
        if path.name.endswith("_questions.json"):
            sibling = path.with_name(path.name.removesuffix("_questions.json") + "_choices.json")
            if sibling.is_file():
                choices = read_json(sibling, "choices file")
                if not isinstance(choices, dict):
                    raise DataError(
                        f"{sibling}: expected the GQA dict of question id -> {{valid, plausible}}"
                    )
        return GQAData(path, {qid_key(k): v for k, v in data.items()}, choices)

    def questions(self, path: Path, split: str | None = None) -> list[Question]:
        data = self.load(path, split)
        out = []
        for qid, q in data.questions.items():
            where = f"{path}: question {qid}"
            image = f"{get_field(q, 'imageId', where)}.jpg"
            out.append(Question(qid, image, f"{get_field(q, 'question', where)}\n{SHORT_ANSWER}"))
        return out

    def score(self, predictions: list[Prediction], annotations: GQAData) -> dict[str, Any]:
        by_qid = unique_by_qid(predictions)
        for k, p in by_qid.items():
            if k not in annotations.questions:
                raise unknown_question(p, annotations.source)
        acc: list[float] = []
        binary: list[float] = []
        open_: list[float] = []
        valid: list[float] = []
        plausible: list[float] = []
        per: dict[str, dict[Any, list[float]]] = {
            k: defaultdict(list) for k in ("struct", "sem", "step", "word")
        }
        gold_dist: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        pred_dist: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        missing = 0
        for qid, q in annotations.questions.items():
            where = f"{annotations.source}: question {qid}"
            if not get_field(q, "isBalanced", where):  # eval.py scores the balanced questions only
                continue
            gold = get_field(q, "answer", where)
            pred = by_qid.get(qid)
            missing += pred is None
            predicted = gqa_normalize(pred.text) if pred is not None else None
            score = float(predicted == gold)
            types = get_field(q, "types", where)
            structural = get_field(types, "structural", f"{where} types")
            acc.append(score)
            per["word"][len(get_field(q, "question", where).split())].append(score)
            per["step"][steps_num(q, where)].append(score)
            per["struct"][structural].append(score)
            per["sem"][get_field(types, "semantic", f"{where} types")].append(score)
            (open_ if structural == "query" else binary).append(score)
            if annotations.choices is not None:
                ch = get_field(annotations.choices, qid, f"{annotations.source}: choices")
                valid.append(float(belongs(predicted, get_field(ch, "valid", where), q)))
                plausible.append(float(belongs(predicted, get_field(ch, "plausible", where), q)))
            group = (q.get("groups") or {}).get("global")
            if group is not None:
                gold_dist[group][gold] += 1
                if predicted is not None:
                    pred_dist[group][predicted] += 1
        chi = chi_square(gold_dist, pred_dist)
        has_choices = annotations.choices is not None
        return {
            "accuracy": pct(ratio(sum(acc), len(acc))),
            "binary": pct(ratio(sum(binary), len(binary))),
            "open": pct(ratio(sum(open_), len(open_))),
            "validity": pct(ratio(sum(valid), len(valid))) if has_choices else None,
            "plausibility": pct(ratio(sum(plausible), len(plausible))) if has_choices else None,
            "distribution": round(chi / 100, 2) if chi is not None else None,
            "by_structural_type": acc_table(per["struct"]),
            "by_semantic_type": acc_table(per["sem"]),
            "by_steps": acc_table(per["step"]),
            "by_words": acc_table(per["word"]),
            "n": len(acc),
            "missing": missing,
        }
