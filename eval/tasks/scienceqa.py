"""ScienceQA: the option letter parsed as LLaVA's eval_science_qa.py does; accuracy overall and on the IMG
subset (questions with an image: LLaVA's "SQA-IMG", the headline), plus the official ScienceQA breakdowns by
subject (NAT/SOC/LAN), context (TXT/IMG/NO) and grade (G1-6/G7-12).

``--annotations``: the ScienceQA folder holding ``problems.json`` (pid -> {question, choices, answer (index),
hint, image, subject, grade, ...}) and ``pid_splits.json``; ``--split`` picks the split (default ``test``).
Question ids are the problem ids. Prompts follow LLaVA-1.5's ``llava_test_CQM-A.json`` + single-pred prompt.
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
    mean_by,
    pct,
    qid_key,
    read_json,
    unique_by_qid,
    unknown_question,
)

OPTIONS = ("A", "B", "C", "D", "E")
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}


def parse_letter(text: str) -> str | None:
    """eval_science_qa.py: a bare letter; "X. " at the start; "The answer is X." / "The answer is X"."""
    text = text.replace("\n", ". ")
    if text.strip() in OPTIONS:
        return text.strip()
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    if "The answer is " in text:
        m = re.search(r"The answer is ([A-E])\.", text) or re.search(r"The answer is ([A-E])", text)
        return m.group(1) if m else None
    return None


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
        return SQAData(path, split, {qid_key(pid): problems[pid] for pid in splits[split]})

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
        subj, ctx, grade = [], [], []
        for p in unique_by_qid(predictions).values():
            prob = annotations.problems.get(qid_key(p.question_id))
            if prob is None:
                raise unknown_question(p, f"{annotations.source}, split {annotations.split}")
            letter = parse_letter(p.text)
            n_choices = len(get_field(prob, "choices", f"problem {p.question_id}"))
            ok = float(
                letter is not None
                and OPTIONS.index(letter) < n_choices
                and OPTIONS.index(letter) == prob["answer"]
            )
            subj.append((SUBJECTS.get(prob.get("subject", ""), "other"), ok))
            # A question can be both TXT and IMG (hint and image), as in the official breakdown.
            contexts = [c for c, has in (("TXT", prob.get("hint")), ("IMG", prob.get("image"))) if has]
            ctx += [(c, ok) for c in contexts or ["NO"]]
            g = re.search(r"\d+", str(prob.get("grade", "")))  # "grade7"
            grade.append(("G1-6" if g is None or int(g.group()) <= 6 else "G7-12", ok))
        by_ctx = mean_by(ctx)
        return {
            "accuracy": pct(sum(ok for _, ok in subj) / len(subj)),
            "img_accuracy": by_ctx.get("IMG", 0.0),
            "by_subject": mean_by(subj),
            "by_context": by_ctx,
            "by_grade": mean_by(grade),
            "n": len(subj),
            "n_img": sum(c == "IMG" for c, _ in ctx),
            "missing": len(annotations.problems) - len(subj),
        }
