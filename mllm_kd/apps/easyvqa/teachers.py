"""A teacher LLM of another family next to the recipe's own (``demo --teacher-llm NAME``).

The demo then also trains a second teacher, the recipe's teacher with only its LLM (and tokenizer, chat
template) swapped (same vision tower, projector, data, steps and learning rates), under
``RUN/teacher-NAME``, and per seed a second LLaVA-KD student, the same student and stages as ``kd`` but
taught by that teacher across tokenizers (``loss.cross_tokenizer=true``, docs/cross-tokenizer.md), under
``RUN/seed<S>/kd-NAME``. Both are scored on the same questions and reported as ``teacher_NAME`` and
``student_kd_NAME``.

With ``--quick`` the LLM is a tiny random model of the same architecture and the tokenizer a byte-level
BPE trained on the data with a different vocabulary size from the student's, so the two tokenizers
still cut the text differently.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mllm_kd.apps.easyvqa.teachers")


@dataclass(frozen=True)
class TeacherLLM:
    name: str  # the --teacher-llm value; also names RUN/models/<name>, RUN/teacher-<name>, seed<S>/kd-<name>
    export: Callable[[Path], Path]  # writes the transformers model directory (dequantised once)
    tiny_config: str  # --quick: a random model of the same family (YAML flow mapping)

    @property
    def teacher_role(self) -> str:
        return f"teacher_{self.name}"

    @property
    def student_role(self) -> str:
        return f"student_kd_{self.name}"

    @property
    def student_sub(self) -> str:
        return f"kd-{self.name}"

    def teacher_dir(self, run: Path) -> Path:
        return run / f"teacher-{self.name}"

    def prepare(self, run: Path, quick: bool) -> None:
        """``RUN/models/<name>`` (the real weights), or with ``quick`` the stand-in's tokenizer there."""
        started = time.perf_counter()
        out = run / "models" / self.name
        if quick:
            quick_tokenizer(run / "data", out)
        else:
            self.export(out)
        log.info("%s ready in %s (%.1f s)", self.name, out, time.perf_counter() - started)

    def teacher_overrides(self, quick: bool) -> list[str]:
        """Swap the teacher's LLM and tokenizer (applied after the recipe's and --quick's overrides)."""
        directory = "${models_dir}/" + self.name
        llm = f"teacher.model.llm={{path: null, config: {self.tiny_config}}}" if quick else None
        return [llm or f"teacher.model.llm.path={directory}", f"teacher.model.tokenizer={directory}"]


_TINY_GEMMA3 = (
    "{model_type: gemma3_text, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
    "num_attention_heads: 2, num_key_value_heads: 1, head_dim: 16, max_position_embeddings: 256}"
)


def _export_gemma3_270m(out: Path) -> Path:
    from mllm_kd.data_prep.weights import export_gemma3_270m

    return export_gemma3_270m(out)


TEACHER_LLMS = {"gemma3-270m": TeacherLLM("gemma3-270m", _export_gemma3_270m, _TINY_GEMMA3)}
STUDENT_OVERRIDES = ("loss.cross_tokenizer=true",)
QUICK_VOCAB = 300  # fewer merges than the quick data tokenizer (556 tokens learnt): words are cut differently


def quick_tokenizer(data: Path, out: Path) -> Path:
    """A byte-level BPE (ChatML template) of :data:`QUICK_VOCAB` tokens trained on the data's turns."""
    from mllm_kd.model.tokenization import IMAGE_TOKEN, train_bpe_tokenizer

    if (out / "tokenizer.json").is_file():
        return out
    texts = [
        turn["value"].replace(IMAGE_TOKEN, "").strip()
        for name in ("captions.json", "instruct.json")
        for record in json.loads((data / name).read_text())
        for turn in record["conversations"]
    ]
    return train_bpe_tokenizer(texts, out, vocab_size=QUICK_VOCAB)


def aligned_share(student_dir: Path) -> dict[str, float]:
    """Per distillation stage (stage1, stage3) of a cross-tokenizer student: the mean over its logged
    steps of ``aligned``, the share of response positions with a teacher counterpart."""
    out = {}
    for stage in ("stage1", "stage3"):
        path = student_dir / stage / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
        values = [row["aligned"] for row in rows if "aligned" in row]
        if values:
            out[stage] = round(statistics.fmean(values), 4)
    return out


def data_aligned_share(records: list[dict], student_tok, teacher_tok, system_prompt: str | None = "") -> dict:
    """Before any training: how many of the student's response positions in ``records`` (their chat
    template for both tokenizers) have a teacher position, by the rule of ``loss.cross_tokenizer``
    (:func:`mllm_kd.data.cross_tokens.align_positions`). ``{"response": n, "aligned": k, "share": k / n}``."""
    from mllm_kd.data.cross_tokens import align_positions, answer_keys
    from mllm_kd.data.encoding import ConversationEncoder
    from mllm_kd.losses import IGNORE_INDEX
    from mllm_kd.model.tokenization import image_token_id

    student, teacher = (
        ConversationEncoder(tok, "chat", 1, image_token_id(tok), system_prompt=system_prompt)
        for tok in (student_tok, teacher_tok)
    )
    response = aligned = 0
    for record in records:
        conv = record["conversations"]
        _, labels = student(conv)
        positions, _ = align_positions(answer_keys(student, conv), labels, answer_keys(teacher, conv))
        response += sum(label != IGNORE_INDEX for label in labels[1:])
        aligned += len(positions)
    return {"response": response, "aligned": aligned, "share": round(aligned / max(response, 1), 4)}
