"""easy-VQA as a local lmms-eval task: ``python -m mllm_kd.eval.lmms --questions Q --answers A --images DIR --out TASK_DIR``.

Writes ``TASK_DIR/easyvqa_local.yaml`` (the task, its data file filled in), ``TASK_DIR/utils.py`` (prompt,
image and scoring functions) and ``TASK_DIR/test.jsonl`` (one line per question: ``question_id``, ``text``,
``answer``, ``type``, ``image_path`` absolute), from the files ``python -m mllm_kd.data_prep.easyvqa`` writes
(``test_questions.jsonl``, ``test_answers.json``, ``images/``). lmms-eval 0.7.3 then evaluates an exported
student (``python -m mllm_kd.export``) with its ``llava_hf`` model::

    python -m lmms_eval --model llava_hf --model_args pretrained=EXPORTED,device=cpu,dtype=float32 \\
        --tasks easyvqa_local --include_path TASK_DIR --batch_size 1 --log_samples --output_path OUT

and its ``exact_match`` equals ``python -m mllm_kd.eval score --task easyvqa``'s accuracy on the same
questions (docs/evaluation.md, "lmms-eval").
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mllm_kd.errors import ArgumentParser, DataError, MllmKdError, exit_code
from mllm_kd.eval.core import iter_jsonl, qid_key, require_file

HERE = Path(__file__).resolve().parent
TASK = "easyvqa_local"


def write_task(
    questions: Path,
    answers: Path,
    images: Path,
    out: Path,
    limit: int | None = None,
    max_new_tokens: int = 16,
) -> Path:
    """Write the lmms-eval task folder ``out``; returns the data file."""
    answer_items = json.loads(require_file(answers, "--answers").read_text(encoding="utf-8"))
    if not isinstance(answer_items, dict):
        raise DataError(f"--answers {answers}: expected a JSON object of question_id -> {{answer, type}}")
    rows = []
    for line, q in iter_jsonl(require_file(questions, "--questions")):
        qid = qid_key(q.get("question_id"))
        item = answer_items.get(qid)
        if item is None:
            raise DataError(f"--questions {questions}:{line}: question {qid} has no answer in {answers}")
        image = (images / q["image"]).resolve()
        if not image.is_file():
            raise DataError(f"--questions {questions}:{line}: image {image} does not exist")
        rows.append(
            {
                "question_id": qid,
                "text": q["text"],
                "answer": item["answer"],
                "type": item.get("type", ""),
                "image_path": str(image),
            }
        )
        if limit is not None and len(rows) >= limit:
            break
    out.mkdir(parents=True, exist_ok=True)
    data = out / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    yaml = (HERE / f"{TASK}.yaml").read_text(encoding="utf-8")
    yaml = yaml.replace("DATA_FILE", json.dumps(str(data.resolve()))).replace(
        "MAX_NEW_TOKENS", str(max_new_tokens)
    )
    (out / f"{TASK}.yaml").write_text(yaml, encoding="utf-8")
    shutil.copyfile(HERE / "utils.py", out / "utils.py")
    return data


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m mllm_kd.eval.lmms", description="easy-VQA as a local lmms-eval task")
    p.add_argument("--questions", type=Path, required=True, help="test_questions.jsonl (LLaVA question file)")
    p.add_argument("--answers", type=Path, required=True, help="test_answers.json")
    p.add_argument(
        "--images", type=Path, required=True, help="the folder the questions' image paths start from"
    )
    p.add_argument("--out", type=Path, required=True, help="the task folder (lmms-eval --include_path)")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length cap (as eval run's, 16)")
    args = p.parse_args(argv)
    try:
        data = write_task(
            args.questions, args.answers, args.images, args.out, args.limit, args.max_new_tokens
        )
    except MllmKdError as e:
        return exit_code(e)
    print(f"task {TASK}: {data} ({sum(1 for _ in data.open())} questions); --include_path {args.out}")
    return 0
