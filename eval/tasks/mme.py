"""MME: yes/no parsed as MME's eval_tool/calculation.py does; per subtask accuracy, accuracy+ (an image
counts only if both its questions are right) and score = 100*(acc + acc+); the perception total (headline,
out of 2000) and cognition total (out of 800) are sums of subtask scores, as calculation.py prints them.

``--annotations``: the official ``MME_Benchmark_release_version`` folder. Each subtask folder holds either
``images/`` + ``questions_answers_YN/`` or flat ``<name>.{jpg,png}`` + ``<name>.txt``; each txt holds one
``question<TAB>Yes|No`` line per question (two per image). LLaVA's ``llava_mme.jsonl`` has no answers and is
not read. A prediction's ``question_id`` is ``"<subtask>/<image file>"`` (LLaVA's form) and its ``prompt``
tells the image's two questions apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mllm_kd.errors import DataError
from mllm_kd.eval.core import SHORT_ANSWER, Prediction, Question, Task, pct
from mllm_kd.eval.normalize import mme_yes_no

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
YES_NO = "Please answer yes or no."


def question_key(text: str) -> str:
    """A question as written in the txt file or in a LLaVA prompt, reduced for matching (whitespace,
    the short-answer instruction and the ``<image>`` token do not count; LLaVA's convert_answer_to_mme.py
    also re-adds "Please answer yes or no." when it is missing)."""
    text = text.replace("<image>", "").replace(SHORT_ANSWER, "")
    text = " ".join(text.split())
    return text if YES_NO in text else f"{text} {YES_NO}"


@dataclass
class MMEData:
    source: Path
    # (subtask, image stem) -> image path relative to the root (None if absent) and [(question, yes|no)]
    images: dict[tuple[str, str], tuple[str | None, list[tuple[str, str]]]] = field(default_factory=dict)


class MMETask(Task):
    name = "mme"
    headline = "perception"
    headline_max = 2000.0

    def load(self, path: Path, split: str | None = None) -> MMEData:
        self.check_split(split)
        if not path.is_dir():
            raise DataError(f"MME folder {path} does not exist or is not a folder")
        data = MMEData(path)
        for sub in sorted(p for p in path.iterdir() if p.is_dir() and p.name != "eval_tool"):
            nested = (sub / "questions_answers_YN").is_dir()
            qa_dir, img_dir = (sub / "questions_answers_YN", sub / "images") if nested else (sub, sub)
            for txt in sorted(qa_dir.glob("*.txt")):
                image = next(
                    (i for e in (".jpg", ".png", ".jpeg") if (i := img_dir / f"{txt.stem}{e}").exists()), None
                )
                qas = []
                for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                    parts = line.strip().split("\t")
                    if line.strip() and (len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no")):
                        raise DataError(f"{txt}:{n}: expected 'question<TAB>Yes|No'")
                    if line.strip():
                        qas.append((parts[0], parts[1].strip().lower()))
                data.images[(sub.name, txt.stem)] = (
                    image.relative_to(path).as_posix() if image else None,
                    qas,
                )
        if not data.images:
            raise DataError(f"{path}: no MME subtask folders with question txt files")
        return data

    def questions(self, path: Path, split: str | None = None) -> list[Question]:
        out = []
        for (sub, stem), (image, qas) in self.load(path, split).images.items():
            if image is None:
                raise DataError(f"{path / sub}: no image for {stem}.txt")
            out += [Question(f"{sub}/{Path(image).name}", image, f"{q}\n{SHORT_ANSWER}") for q, _ in qas]
        return out

    def score(self, predictions: list[Prediction], annotations: MMEData) -> dict[str, Any]:
        answered: dict[tuple[str, str], dict[str, bool]] = {}  # image -> question key -> correct
        for p in predictions:
            sub, _, file = str(p.question_id).partition("/")
            img = (sub, Path(file).stem)
            gold = {question_key(q): a for q, a in annotations.images.get(img, (None, []))[1]}
            key = question_key(p.prompt)
            if key not in gold:
                raise DataError(
                    f"{p.where}: question_id {p.question_id!r} with prompt {p.prompt!r} is not in the annotations ({annotations.source})"
                )
            if key in answered.setdefault(img, {}):
                raise DataError(f"{p.where}: question {key!r} of {p.question_id!r} answered twice")
            answered[img][key] = mme_yes_no(p.text) == gold[key]
        subtasks: dict[str, dict[str, float]] = {}
        for sub in sorted({s for s, _ in answered}):
            imgs = [(img, res) for img, res in answered.items() if img[0] == sub]
            acc = sum(sum(r.values()) for _, r in imgs) / sum(len(r) for _, r in imgs)
            # accuracy+: every question of the image (normally 2) answered and right
            plus = sum(
                all(r.values()) and len(r) == len(annotations.images[img][1]) for img, r in imgs
            ) / len(imgs)
            subtasks[sub] = {
                "accuracy": pct(acc),
                "accuracy_plus": pct(plus),
                "score": 100 * (acc + plus),
                "n": sum(len(r) for _, r in imgs),
            }
        n = sum(len(r) for r in answered.values())
        return {
            "perception": round(sum(v["score"] for k, v in subtasks.items() if k in PERCEPTION), 2),
            "cognition": round(sum(v["score"] for k, v in subtasks.items() if k in COGNITION), 2),
            "subtasks": {k: {**v, "score": round(v["score"], 2)} for k, v in subtasks.items()},
            "n": n,
            "missing": sum(len(qas) for _, qas in annotations.images.values()) - n,
        }
