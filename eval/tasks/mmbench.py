"""MMBench: circular evaluation with OpenCompass VLMEvalKit's answer matching, without its ChatGPT judge.

``--annotations``: the MMBench TSV (``index, question, hint, A, B, C, D, answer, category, l2-category,
image`` (base64), ...; the dev split has answers). A question and its circular variants form one group: rows
whose ``index`` agree modulo 1,000,000 (MMBench stores shifted copies at index + k*1e6) and LLaVA's
``--all-rounds`` answers to one row (same ``question_id``, ``round_id`` 0..n-1, the shown ``options`` and
their original letters ``option_char``). As VLMEvalKit's ``mcq_circular_eval`` (exact-matching policy):
a group is scored when its original question (index below 1,000,000) is answered, and is right only if every
answered variant is; the headline ``accuracy`` is over groups, ``by_category`` / ``by_l2_category`` as its
``report_acc`` (by the original row's categories). ``incomplete`` counts groups with fewer variants answered
than exist (then the result is not fully circular). The letter is read from free text by :func:`can_infer`
(VLMEvalKit's ``can_infer`` on the options as shown); "Z" (a refusal) and an unparsed answer are wrong.
VLMEvalKit then asks a ChatGPT judge about the unparsed ones; that is not reproduced, so ``unparsed``
says how many answers a judge could still have turned right. ``single_pass_accuracy`` is VLMEvalKit's
vanilla accuracy on the original questions only (its ``vanilla_0``). VLMEvalKit writes fractions unrounded;
here percentages rounded to 2 decimals.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mllm_kd.errors import DataError
from mllm_kd.eval.core import OPTION_LETTER, Prediction, Question, Task, mean_by, pct, require_file
from mllm_kd.eval.normalize import can_infer

LETTERS = "ABCDEFGHI"
CIRCULAR_STRIDE = 1_000_000


@dataclass
class MMBRow:
    index: int
    question: str
    hint: str
    options: list[str]
    answer: str
    category: str
    l2_category: str
    image_b64: str | None


@dataclass
class MMBData:
    source: Path
    rows: dict[int, MMBRow] = field(default_factory=dict)

    def groups(self) -> dict[int, list[MMBRow]]:
        """Original index -> its rows (the question and any circular copies), original first."""
        out: dict[int, list[MMBRow]] = {}
        for i in sorted(self.rows):
            out.setdefault(i % CIRCULAR_STRIDE, []).append(self.rows[i])
        return out

    @property
    def circular_in_file(self) -> bool:
        return any(i >= CIRCULAR_STRIDE for i in self.rows)


def _blank(v: str | None) -> bool:
    return v is None or v.strip().lower() in ("", "nan", "none")  # pandas writes missing cells as "nan"


class MMBenchTask(Task):
    name = "mmbench"

    def load(self, path: Path, split: str | None = None) -> MMBData:
        self.check_split(split)
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images exceed the 128 kB default
        data = MMBData(path)
        with open(require_file(path, "MMBench TSV"), encoding="utf-8", newline="") as f:
            for n, rec in enumerate(csv.DictReader(f, delimiter="\t"), 2):
                try:
                    idx = int(float(rec["index"]))
                    if idx in data.rows:
                        raise DataError(f"{path}:{n}: index {idx} appears twice in the MMBench TSV")
                    options = []
                    for letter in LETTERS:
                        if _blank(rec.get(letter)):
                            break
                        options.append(rec[letter])
                    data.rows[idx] = MMBRow(
                        idx,
                        rec["question"],
                        "" if _blank(rec.get("hint")) else rec["hint"],
                        options,
                        (rec.get("answer") or "").strip(),
                        rec.get("category") or "",
                        rec.get("l2-category") or "",
                        rec.get("image"),
                    )
                except (KeyError, TypeError, ValueError) as e:
                    raise DataError(f"{path}:{n}: malformed MMBench row ({e!r})") from e
        return data

    def questions(self, path: Path, split: str | None = None) -> list[Question]:
        """One question per row; without circular rows in the file, every rotation of the options."""
        data = self.load(path, split)
        out = []
        for row in data.rows.values():
            opts, chars = list(row.options), list(LETTERS[: len(row.options)])
            for r in range(1 if data.circular_in_file else len(opts)):
                text = f"{row.hint}\n{row.question}" if row.hint else row.question
                text += "".join(f"\n{LETTERS[i]}. {o}" for i, o in enumerate(opts)) + f"\n{OPTION_LETTER}"
                extra = {"round_id": r, "options": list(opts), "option_char": list(chars)}
                out.append(Question(row.index, None, text, image_b64=row.image_b64, extra=extra))
                opts, chars = opts[1:] + opts[:1], chars[1:] + chars[:1]
        return out

    def score(self, predictions: list[Prediction], annotations: MMBData) -> dict[str, Any]:
        groups: dict[int, list[bool]] = {}
        seen: dict[tuple[int, int], str] = {}
        single, unparsed = [], 0
        for p in predictions:
            try:
                idx, rnd = int(p.question_id), int(p.get("round_id", 0) or 0)
            except (TypeError, ValueError) as e:
                raise DataError(f"{p.where}: MMBench question_id/round_id must be integers ({e})") from e
            row = annotations.rows.get(idx)
            if row is None:
                raise DataError(
                    f"{p.where}: question_id {p.question_id!r} is not in the annotations ({annotations.source})"
                )
            if not row.answer:
                raise DataError(
                    f"{annotations.source}: row {idx} has no answer (a test split is scored by the MMBench server)"
                )
            if (idx, rnd) in seen:
                raise DataError(
                    f"{p.where}: question {idx} round {rnd} answered twice (first at {seen[idx, rnd]})"
                )
            seen[idx, rnd] = p.where
            shown = p.get("options") or row.options
            chars = p.get("option_char") or list(LETTERS[: len(shown)])
            if len(chars) != len(shown) or row.answer not in chars:
                raise DataError(
                    f"{p.where}: 'options'/'option_char' do not match row {idx} (answer {row.answer!r})"
                )
            # the answer in the letters shown: where the TSV row's answer option was put
            gt = LETTERS[list(chars).index(row.answer)]
            letter = can_infer(p.text, dict(zip(LETTERS, (str(o) for o in shown))))
            unparsed += letter is None
            ok = letter == gt
            groups.setdefault(idx % CIRCULAR_STRIDE, []).append(ok)
            if idx < CIRCULAR_STRIDE and rnd == 0:
                single.append(ok)
        rows = annotations.groups()
        originals = {i % CIRCULAR_STRIDE for i, _ in seen if i < CIRCULAR_STRIDE}
        # VLMEvalKit scores a group only through its original row; copies answered without it are left out
        scored = {g: v for g, v in groups.items() if g in originals}
        main = {g: rows[g][0] for g in scored}
        # variants of a group: its copies in the file, else (LLaVA rounds) one per option
        variants = {g: len(rows[g]) if len(rows[g]) > 1 else len(main[g].options) for g in scored}
        results = [(g, float(all(v))) for g, v in scored.items()]
        if not results:
            raise DataError(f"{annotations.source}: no original question (index < 1e6) is answered")
        return {
            "accuracy": pct(sum(s for _, s in results) / len(results)),
            "single_pass_accuracy": pct(sum(single) / len(single)) if single else None,
            "by_category": mean_by([(main[g].category, s) for g, s in results]),
            "by_l2_category": mean_by([(main[g].l2_category, s) for g, s in results]),
            "n": len(results),
            "n_answers": len(seen),
            "unparsed": unparsed,
            "incomplete": sum(len(scored[g]) < variants[g] for g in scored),
            "missing": len(rows) - len(results),
        }
