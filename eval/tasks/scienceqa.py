"""ScienceQA: the option letter parsed and scored as LLaVA's ``llava/eval/eval_science_qa.py`` does
(accuracy over every problem of the split and "IMG-Accuracy", LLaVA's SQA-IMG, the headline), plus the
breakdowns of ScienceQA's ``tools/evaluate_acc.py`` (subject, context, grade, topic).

Parsing (:func:`parse_letter`), exactly as eval_science_qa.py: the whole answer equal to one of "A".."E"
(no stripping: " A" or "C\n" fail); else "X. " at its very start; else ``The answer is ([A-Z]).`` (the
final "." matches any character but a newline) must match exactly once. A letter beyond the problem's
choices, or a failed parse, is wrong.

Scoring: every problem of the split counts; one without an answer is wrong ("FAILED" there).
``img_accuracy`` is LLaVA's: over the answered problems whose prompt carried the image (the answers'
``prompt`` has ``<image>`` exactly for the problems with an image), so an unanswered image problem is left
out of it, as there; ``by_context["IMG"]`` is evaluate_acc.py's ``acc_has_image``, over all image problems
of the split (an unanswered one wrong). With a complete answers file the two are equal.

``--annotations``: the ScienceQA folder holding ``problems.json`` (pid -> {question, choices, answer (index),
hint, image, subject, grade, topic, ...}) and ``pid_splits.json``; ``--split`` picks the split (default
``test``, the only one evaluate_acc.py accepts). Question ids are the problem ids. Prompts follow LLaVA-1.5's
``llava_test_CQM-A.json`` + single-pred prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm_kd.errors import ConfigError, DataError
from mllm_kd.eval.core import (
    OPTION_LETTER,
    Prediction,
    Question,
    Task,
    get_field,
    index_unique,
    mean_by,
    pct,
    ratio,
    read_json,
    unique_by_qid,
    unknown_question,
)

OPTIONS = ("A", "B", "C", "D", "E")  # eval_science_qa.py's --options
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
GRADES = {**{f"grade{g}": "G1-6" for g in range(1, 7)}, **{f"grade{g}": "G7-12" for g in range(7, 13)}}
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")  # the "." unescaped, as in eval_science_qa.py


def parse_letter(text: str) -> str | None:
    """eval_science_qa.py's parse: the letter, or None where it records "FAILED"."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


@dataclass
class SQAData:
    source: Path
    split: str
    problems: dict[str, dict]  # pid -> problem, the split's problems only


class ScienceQATask(Task):
    name = "scienceqa"
    headline = "img_accuracy"
    has_splits = True

    def load(self, path: Path, split: str | None = None) -> SQAData:
        split = split or "test"
        splits, problems = read_json(path / "pid_splits.json"), read_json(path / "problems.json")
        if split not in splits:
            raise ConfigError(f"{path / 'pid_splits.json'}: no split {split!r} (has {', '.join(splits)})")
        missing = [pid for pid in splits[split] if pid not in problems]
        if missing:
            raise DataError(f"{path / 'problems.json'}: split {split} lists unknown problems {missing[:5]}")
        where = f"{path / 'pid_splits.json'}: split {split}"
        return SQAData(path, split, index_unique((pid, problems[pid], where) for pid in splits[split]))

    def questions(self, path: Path, split: str | None = None) -> list[Question]:
        data = self.load(path, split)
        out = []
        for pid, prob in data.problems.items():
            where = f"{path / 'problems.json'}: problem {pid}"
            choices = "\n".join(f"{OPTIONS[i]}. {c}" for i, c in enumerate(get_field(prob, "choices", where)))
            context = f"Context: {prob['hint']}\n" if prob.get("hint") else ""
            prompt = f"{context}{get_field(prob, 'question', where)}\n{choices}\n{OPTION_LETTER}"
            out.append(Question(pid, f"{pid}/{prob['image']}" if prob.get("image") else None, prompt))
        return out

    def score(self, predictions: list[Prediction], annotations: SQAData) -> dict[str, Any]:
        by_qid = unique_by_qid(predictions)
        for k, p in by_qid.items():
            if k not in annotations.problems:
                raise unknown_question(p, f"{annotations.source}, split {annotations.split}")
        subj, ctx, grade, topic, img = [], [], [], [], []
        n_correct = 0
        for pid, prob in annotations.problems.items():
            where = f"{annotations.source / 'problems.json'}: problem {pid}"
            choices, answer = get_field(prob, "choices", where), get_field(prob, "answer", where)
            pred = by_qid.get(pid)
            letter = parse_letter(pred.text) if pred is not None else None
            # get_pred_idx: a letter beyond the choices is -1, never the answer
            ok = letter in OPTIONS[: len(choices)] and OPTIONS.index(letter) == answer
            n_correct += ok
            if pred is not None and prob.get("image"):
                img.append(ok)
            subj.append((SUBJECTS.get(prob.get("subject", ""), "other"), ok))
            # A problem can be both TXT and IMG (hint and image), as in the official breakdown.
            contexts = [c for c, has in (("TXT", prob.get("hint")), ("IMG", prob.get("image"))) if has]
            ctx += [(c, ok) for c in contexts or ["NO"]]
            if prob.get("grade") in GRADES:
                grade.append((GRADES[prob["grade"]], ok))
            if prob.get("topic"):
                topic.append((str(prob["topic"]), ok))
        n = len(annotations.problems)
        return {
            "accuracy": pct(ratio(n_correct, n)),
            "img_accuracy": pct(ratio(sum(img), len(img))),
            "by_subject": mean_by(subj),
            "by_context": mean_by(ctx),
            "by_grade": mean_by(grade),
            "by_topic": mean_by(topic),
            "n": n,
            "n_img": len(img),
            "missing": n - len(by_qid),
        }
