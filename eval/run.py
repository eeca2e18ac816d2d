"""Answer a benchmark's questions with a checkpoint: ``python -m mllm_kd.eval run``.

::

    python -m mllm_kd.eval run --model CKPT_DIR --task TASK --questions FILE_OR_DIR --images DIR
        --out ANSWERS.jsonl [--split S] [--batch-size N] [--max-new-tokens N] [--chunk-index i --chunk-count n]
        [--device auto|cpu|cuda|cuda:N] [--dtype auto|float32|bfloat16|float16] [--model-id NAME] [--limit N]

``--questions`` is what the task's ``score --annotations`` reads (e.g. the VQAv2 questions JSON, the GQA
questions JSON, the POPE folder, the MMBench TSV): prompts are built by the task's ``questions()`` with the
LLaVA-1.5 conventions (e.g. "Answer the question using a single word or phrase."). For ``easyvqa`` a LLaVA
question file (JSONL of ``question_id``, ``image``, ``text``, such as ``test_questions.jsonl`` from
``python -m mllm_kd.data_prep.easyvqa``) is accepted too; its ``text`` is the prompt as is. Image paths are
relative to ``--images``; MMBench's images are decoded from the TSV's base64 column.

Generation is :class:`mllm_kd.model.generate.Generator`: batched greedy decoding, KV cache, left padding, stop at
EOS or the chat template's end of turn; the chat template and system prompt are the ones the checkpoint was
trained with (its ``config.yaml``) unless ``--template`` / ``--system-prompt`` say otherwise.

Output: LLaVA answer lines ``{question_id, prompt, text, answer_id, model_id, metadata}`` (``prompt`` without
the ``<image>`` token, as LLaVA writes it) plus the task's extra keys at top level (MMBench: ``round_id``,
``options``, ``option_char``), appended one batch at a time. Re-running the same command resumes: complete
lines are kept, a torn last line is dropped, and only unanswered questions are generated (a line is matched
to its question by question id, MMBench round and prompt, so MME's several questions per image resume too).

Splitting the work: ``--chunk-index i --chunk-count n``, or ``torchrun --nproc_per_node n -m mllm_kd.eval
run ...`` (``RANK`` / ``WORLD_SIZE``, one GPU per process by ``LOCAL_RANK``; no process group is used). The
questions are cut into n contiguous chunks; chunk i is written to ``ANSWERS.chunk{i}-of-{n}.jsonl`` next to
``--out`` (and resumes like above). The process that finds every chunk file complete once its own chunk is
done merges them, in question order, into ``--out`` (written atomically); re-running any chunk's command
after all finished merges again. The chunk files are kept. Chunk processes on several machines need a
shared file system for the merge.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from mllm_kd.errors import ConfigError, DataError
from mllm_kd.eval.answers import chunk_of, chunk_path, complete_lines, merge_chunks, pending
from mllm_kd.eval.core import Question, index_unique, iter_jsonl
from mllm_kd.eval.tasks import TASKS, get_task
from mllm_kd.runtime.work import chunk_bounds

DTYPES = ("auto", "float32", "bfloat16", "float16")


# ------------------------------------------------------------------------------------------ arguments
def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        metavar="CKPT_DIR",
        required=True,
        type=Path,
        help="checkpoint directory (or a stage folder with final/)",
    )
    p.add_argument("--task", required=True, choices=list(TASKS), help="benchmark")
    p.add_argument(
        "--questions",
        metavar="FILE_OR_DIR",
        required=True,
        type=Path,
        help="the benchmark's question file or folder (what `score --annotations` takes; easyvqa: "
        "also a LLaVA question JSONL)",
    )
    p.add_argument(
        "--images",
        metavar="DIR",
        type=Path,
        default=None,
        help="folder the questions' image paths are relative to",
    )
    p.add_argument(
        "--out",
        metavar="ANSWERS.jsonl",
        required=True,
        type=Path,
        help="answers file (LLaVA JSONL); resumed if it exists",
    )
    p.add_argument(
        "--split",
        metavar="S",
        default=None,
        help="split (scienceqa: default test; pope: one split, default all)",
    )
    p.add_argument(
        "--batch-size", metavar="N", type=positive_int, default=16, help="questions per generate call (16)"
    )
    p.add_argument(
        "--max-new-tokens",
        metavar="N",
        type=positive_int,
        default=16,
        help="answer length cap in tokens (16)",
    )
    p.add_argument(
        "--chunk-index", metavar="I", type=int, default=None, help="answer only chunk i of --chunk-count"
    )
    p.add_argument(
        "--chunk-count", metavar="N", type=positive_int, default=None, help="number of chunks (processes)"
    )
    p.add_argument(
        "--device", metavar="DEVICE", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N"
    )
    p.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="weights dtype (auto: bfloat16 on CUDA, else float32)"
    )
    p.add_argument(
        "--model-id",
        metavar="NAME",
        default=None,
        help="model_id of the answer lines (default: from --model)",
    )
    p.add_argument(
        "--template",
        default=None,
        choices=("auto", "chat", "plain", "caption"),
        help="prompt template (default: the checkpoint's data.template)",
    )
    p.add_argument(
        "--system-prompt", metavar="TEXT", default=None, help="system message (default: the checkpoint's)"
    )
    p.add_argument(
        "--limit",
        metavar="N",
        type=positive_int,
        default=None,
        help="only the first N questions (a quick trial)",
    )
    p.add_argument("--workers", metavar="N", type=int, default=4, help="image-decoding threads (4)")
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar"
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


# ------------------------------------------------------------------------------------------ questions
def is_llava_question_file(path: Path) -> bool:
    """Whether ``path`` is JSONL whose first record has ``question_id`` and ``text`` (LLaVA's format)."""
    if not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        obj = json.loads(first)
    except ValueError:  # not JSON, or not UTF-8: the task's own reader names the problem
        return False
    return isinstance(obj, dict) and "question_id" in obj and isinstance(obj.get("text"), str)


def read_llava_questions(path: Path) -> list[Question]:
    out = []
    for n, q in iter_jsonl(path, "question file"):
        qid, text, image = q.get("question_id"), q.get("text"), q.get("image")
        if not isinstance(qid, (int, str)) or isinstance(qid, bool) or not isinstance(text, str):
            raise DataError(f"{path}:{n}: a question needs 'question_id' (int or str) and 'text' (str)")
        if image is not None and not isinstance(image, str):
            raise DataError(f"{path}:{n}: 'image' must be a path")
        out.append((qid, Question(qid, image or None, text), f"{path}:{n}"))
    return list(index_unique(out).values())  # a question_id twice is an error naming both lines


def load_questions(task_name: str, path: Path, split: str | None) -> list[Question]:
    task = get_task(task_name)
    if not path.exists():
        raise DataError(f"question file or folder {path} does not exist")
    if task_name == "easyvqa" and is_llava_question_file(path):
        task.check_split(split)
        questions = read_llava_questions(path)
    else:
        questions = task.questions(path, split)
    if not questions:
        raise DataError(f"{path}: no questions")
    return questions


def check_images(questions: list[Question], images: Path | None) -> None:
    """Fail before loading the model when the image folder or any image file is missing."""
    named = [q for q in questions if q.image and not q.image_b64]
    if not named:
        return
    if images is None:
        raise ConfigError(f"--images is needed: the questions name image files (e.g. {named[0].image})")
    if not images.is_dir():
        raise DataError(f"image folder {images} does not exist")
    missing = [q.image for q in named if not (images / q.image).is_file()]
    if missing:
        raise DataError(f"{len(missing)} image(s) missing under {images}, e.g. {', '.join(missing[:3])}")


# ----------------------------------------------------------------------------------------- generation
def default_model_id(ckpt: Path) -> str:
    """``runs/demo/stage3/final`` -> ``demo/stage3``; ``.../stage3/checkpoints/step-100`` -> ``stage3/step-100``."""
    parts = [p for p in ckpt.resolve().parts if p not in ("final", "checkpoints")]
    return "/".join(parts[-2:])


def pick_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def question_pixels(generator, q: Question, images: Path | None):
    """``[1, 3, H, W]`` for a question with an image (a file or base64), else None."""
    where = f"question {q.question_id}"
    if q.image_b64:
        try:
            data = base64.b64decode(q.image_b64, validate=False)
        except (binascii.Error, ValueError) as e:
            raise DataError(f"{where}: the base64 image does not decode ({e})") from e
        return generator.images.load(data, where)[None]
    if q.image:
        assert images is not None  # check_images ran
        return generator.images.load(images / q.image, where)[None]
    return None


def answer_row(q: Question, text: str, model_id: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "question_id": q.question_id,
        "prompt": q.prompt,
        "text": text,
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "metadata": {},
    }
    for k, v in q.extra.items():
        row.setdefault(k, v)
    return row


def generate_answers(
    generator,
    todo: list[Question],
    images: Path | None,
    path: Path,
    model_id: str,
    batch_size: int,
    workers: int = 4,
    progress: bool = True,
    total: int | None = None,
    desc: str = "answering",
) -> None:
    """Answer ``todo`` into ``path`` (appending a batch at a time; :func:`mllm_kd.model.generate.answer_batches`:
    similar prompt lengths batched together, the next batch's images decoded on ``workers`` threads while the
    current one generates)."""
    from tqdm.auto import tqdm

    from mllm_kd.model.generate import answer_batches

    total = len(todo) if total is None else total
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(path, "a", encoding="utf-8") as f,
        tqdm(total=total, initial=total - len(todo), desc=desc, disable=not progress, unit="q") as bar,
    ):
        answer_batches(
            generator,
            todo,
            f,
            batch_size=batch_size,
            key=lambda q: len(q.prompt),  # similar lengths pad less
            text=lambda q: q.prompt,
            pixels=lambda q: question_pixels(generator, q, images),
            row=lambda q, _prompt, text: answer_row(q, text, model_id),
            bar=bar,
            workers=workers,
        )


def load_generator(args: argparse.Namespace, ckpt: Path, local_rank: int):
    from mllm_kd.checkpoint.generator import checkpoint_generator
    from mllm_kd.runtime.device import pick_device

    device = pick_device(args.device, local_rank)
    return checkpoint_generator(
        ckpt,
        device,
        dtype=pick_dtype(args.dtype, device),
        max_new_tokens=args.max_new_tokens,
        template=args.template,
        system_prompt=args.system_prompt,
    )


# ------------------------------------------------------------------------------------------------ run
def run_run(args: argparse.Namespace) -> int:
    from mllm_kd.checkpoint.native import resolve_checkpoint

    index, count = chunk_of(args)
    if args.workers < 0:
        raise ConfigError("--workers must be >= 0")
    ckpt = resolve_checkpoint(args.model)
    questions = load_questions(args.task, args.questions, args.split)
    if args.limit is not None:
        questions = questions[: args.limit]
    out: Path = args.out
    if count > 1 and complete_lines(out, questions) is not None:
        print(f"run: {out} already answers all {len(questions)} questions", file=sys.stderr)
        return 0
    part = chunk_path(out, index, count) if count > 1 else out
    lo, hi = chunk_bounds(len(questions), index, count)
    mine = questions[lo:hi]
    todo = pending(part, mine)
    check_images(todo, args.images)
    if todo:
        model_id = args.model_id or default_model_id(ckpt)
        generator = load_generator(args, ckpt, int(os.environ.get("LOCAL_RANK", "0") or 0))
        chunk = f" chunk {index}/{count}" if count > 1 else ""
        generate_answers(
            generator,
            todo,
            args.images,
            part,
            model_id,
            args.batch_size,
            args.workers,
            args.progress,
            total=len(mine),
            desc=f"{args.task}{chunk} ({model_id})",
        )
    print(
        f"run: {part}: {len(mine)} answers ({len(mine) - len(todo)} resumed, {len(todo)} generated)",
        file=sys.stderr,
    )
    if count > 1:
        if merge_chunks(out, questions, count):
            print(f"run: merged the {count} chunk files into {out}", file=sys.stderr)
        else:
            print(
                f"run: {out} is written once every chunk is complete (by the process finishing last)",
                file=sys.stderr,
            )
    return 0
