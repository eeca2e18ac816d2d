"""POPE: yes/no parsed as LLaVA's eval_pope.py does; accuracy, precision, recall, F1 (positive = "yes") and
the yes-ratio per split, in percent. The headline ``f1`` is the mean over the splits scored.

``--annotations``: a folder of the official ``coco_pope_{adversarial,popular,random}.json`` (JSONL of
``{question_id, image, text, label}``) or one such file; ``--split`` keeps one split (answers to the others
are skipped). A prediction names its split by ``question_id`` ``"{split}/{id}"`` (what :meth:`questions`
emits) or ``metadata.category``; with a single split loaded a bare id is enough. LLaVA's renumbered ids work
when the folder also holds LLaVA's ``llava_pope_test.jsonl`` (``{question_id, image, text, category}``):
they are matched on image and question text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mllm_kd.errors import ConfigError, DataError
from mllm_kd.eval.core import (
    SHORT_ANSWER,
    Prediction,
    Question,
    Task,
    get_field,
    index_unique,
    iter_jsonl,
    pct,
    ratio,
)
from mllm_kd.eval.normalize import pope_yes_no


@dataclass
class POPEData:
    source: Path
    split: str | None = None  # the --split kept (predictions of other splits are skipped)
    all_splits: set[str] = field(default_factory=set)  # every coco_pope_<split>.json seen
    rows: dict[str, dict[str, dict]] = field(default_factory=dict)  # split -> question_id -> annotation line
    by_text: dict[tuple[str, Any, Any], dict] = field(default_factory=dict)  # (split, image, text) -> line
    llava: dict[str, dict] = field(default_factory=dict)  # LLaVA question_id -> {image, text, category}


def binary_metrics(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """(predicted, label) yes/no pairs -> accuracy, precision, recall, F1, yes-ratio (percent)."""
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + sum(p == "no" and g == "yes" for p, g in pairs))
    f1 = ratio(2 * precision * recall, precision + recall)
    yes = sum(p == "yes" for p, _ in pairs)
    return {
        "accuracy": pct(ratio(tp + tn, len(pairs))),
        "precision": pct(precision),
        "recall": pct(recall),
        "f1": pct(f1),
        "yes_ratio": pct(ratio(yes, len(pairs))),
        "n": len(pairs),
    }


class POPETask(Task):
    name = "pope"
    headline = "f1"
    has_splits = True

    def load(self, path: Path, split: str | None = None) -> POPEData:
        files = sorted(path.glob("coco_pope_*.json")) if path.is_dir() else [path]
        if not files:
            raise DataError(f"{path}: no coco_pope_*.json files")
        data = POPEData(path, split)
        for f in files:
            name = f.stem.removeprefix("coco_pope_")
            data.all_splits.add(name)
            if split is None or name == split:
                lines = list(iter_jsonl(f))
                rows = index_unique(
                    (get_field(obj, "question_id", f"{f}:{n}"), obj, f"{f}:{n}") for n, obj in lines
                )
                data.rows.setdefault(name, {}).update(rows)
                for _, obj in lines:
                    data.by_text[(name, obj.get("image"), obj.get("text"))] = obj
        if not data.rows:
            raise ConfigError(f"{path}: no POPE split {split!r}")
        llava = path / "llava_pope_test.jsonl"
        if path.is_dir() and llava.is_file():
            data.llava = {str(get_field(o, "question_id", f"{llava}:{n}")): o for n, o in iter_jsonl(llava)}
        return data

    def questions(self, path: Path, split: str | None = None) -> list[Question]:
        data = self.load(path, split)
        return [
            Question(f"{s}/{q}", r.get("image"), f"{r.get('text')}\n{SHORT_ANSWER}")
            for s, rows in data.rows.items()
            for q, r in rows.items()
        ]

    def _label(self, p: Prediction, data: POPEData) -> tuple[str, str, str] | None:
        """(split, split/question_id, label) of a prediction; None if its split was left out by --split."""
        qid, split = str(p.question_id), p.get("category") or p.get("split")
        if split is None and qid.split("/", 1)[0] in data.all_splits:
            split, qid = qid.split("/", 1)
        if split is None and qid in data.llava:  # LLaVA's renumbered ids: match image and question text
            q = data.llava[qid]
            split, text = str(q.get("category")), str(q.get("text", "")).split("\n")[0]
            row = data.by_text.get((split, q.get("image"), text))
        else:
            split = next(iter(data.rows)) if split is None and len(data.rows) == 1 else split
            row = data.rows.get(str(split), {}).get(qid)
        if data.split is not None and split != data.split:
            return None
        if row is None:
            raise DataError(
                f"{p.where}: question_id {p.question_id!r} (split {split}) is not in the annotations ({data.source})"
            )
        label = row.get("label")
        if label not in ("yes", "no"):
            raise DataError(
                f"{data.source}: split {split} question {row['question_id']}: label must be yes/no, got {label!r}"
            )
        return str(split), f"{split}/{row['question_id']}", label

    def score(self, predictions: list[Prediction], annotations: POPEData) -> dict[str, Any]:
        pairs: dict[str, list[tuple[str, str]]] = {}
        seen: dict[str, str] = {}
        skipped = 0
        for p in predictions:
            found = self._label(p, annotations)
            if found is None:
                skipped += 1
                continue
            split, key, label = found
            if key in seen:
                raise DataError(f"{p.where}: answers POPE question {key} again (first at {seen[key]})")
            seen[key] = p.where
            pairs.setdefault(split, []).append((pope_yes_no(p.text), label))
        splits = {s: binary_metrics(v) for s, v in sorted(pairs.items())}
        total = sum(len(r) for r in annotations.rows.values())
        return {
            "f1": round(sum(m["f1"] for m in splits.values()) / len(splits), 2),
            "accuracy": round(sum(m["accuracy"] for m in splits.values()) / len(splits), 2),
            "splits": splits,
            "n": len(seen),
            "missing": total - len(seen),
            "skipped_other_splits": skipped,
        }
