"""Command line of the evaluation package: ``python -m mllm_kd.eval COMMAND ...``.

* ``run --model CKPT --task TASK --questions FILE_OR_DIR --images DIR --out ANSWERS.jsonl [...]``: generate the
  answers file with a checkpoint (batched greedy decoding, resumable, split over processes; see :mod:`.run`).
* ``score --task TASK --predictions ANSWERS.jsonl --annotations FILE_OR_DIR [--split S] [--out SCORES.json]
  [--submission UPLOAD.json] [--model-id NAME]``: prints one JSON object of metrics (see each task's module
  for the annotation layout it reads); ``--out`` also writes it, by convention to ``RUN_DIR/eval/TASK.json``.
* ``report RUN_DIR... [--out TABLE.md]``: the markdown table of the runs' scores (see :mod:`.report`).

Each command is a :class:`Command` in :data:`COMMANDS`.
Input errors (:class:`mllm_kd.errors.MllmKdError`) are printed without a traceback and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mllm_kd.atomic import atomic_write_bytes
from mllm_kd.errors import ArgumentParser, DataError, MllmKdError, exit_code
from mllm_kd.eval.core import read_predictions
from mllm_kd.eval.report import report
from mllm_kd.eval.run import add_run_arguments, run_run
from mllm_kd.eval.tasks import TASKS, get_task
from mllm_kd.runtime.allocator import reuse_freed_memory


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------------------------- score
def add_score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=list(TASKS), help="benchmark")
    p.add_argument("--predictions", required=True, type=Path, help="LLaVA answers file (JSONL)")
    p.add_argument(
        "--annotations", required=True, type=Path, help="the benchmark's annotation file or folder"
    )
    p.add_argument("--split", default=None, help="split to score (scienceqa: default test; pope: one split)")
    p.add_argument(
        "--out", type=Path, default=None, help="also write the scores here (RUN_DIR/eval/TASK.json)"
    )
    p.add_argument(
        "--submission",
        type=Path,
        default=None,
        help="write the evaluation server's upload file (vqav2, vizwiz)",
    )
    p.add_argument("--model-id", default=None, help="name for the report (default: the answers' model_id)")
    p.add_argument(
        "--log-to",
        type=Path,
        default=None,
        metavar="STAGE_DIR",
        help="also log the scores to the trackers (TensorBoard / W&B) of the stage that made the model",
    )


def model_id_of(preds: Sequence[Any]) -> str:
    ids = list(dict.fromkeys(p.model_id for p in preds if p.model_id))
    if len(ids) > 1:
        print(f"score: the answers name several models ({', '.join(ids)}); using {ids[0]}", file=sys.stderr)
    return ids[0] if ids else ""


def run_score(args: argparse.Namespace) -> int:
    task = get_task(args.task)
    preds = read_predictions(args.predictions)
    annotations = task.load(args.annotations, args.split)
    result: dict[str, Any] = {
        "task": task.name,
        "model_id": args.model_id or model_id_of(preds),
        "headline": task.headline,
    }
    if not task.has_answers(annotations) and args.submission is None:
        raise DataError(
            f"{args.annotations} has no answers (a test split): write the upload file with --submission"
        )
    scores = task.score(preds, annotations) if task.has_answers(annotations) else {}
    if args.submission is not None:  # only once scoring found no error: a failed run writes nothing
        result.update(task.write_submission(preds, annotations, args.submission))
    result.update(scores)
    result.update(predictions=str(args.predictions), annotations=str(args.annotations))
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.out, (text + "\n").encode("utf-8"))
    if args.log_to is not None:  # experiment tracking (mllm_kd/tracking.py)
        from mllm_kd.tracking import log_scores

        if not log_scores(args.log_to, result):
            print(f"score: {args.log_to} logged to no tracker (its config's log section)", file=sys.stderr)
    print(text)
    return 0


# --------------------------------------------------------------------------------------------- report
def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders with eval/*.json (or score files)"
    )
    p.add_argument("--out", type=Path, default=None, help="also write the table here")


def run_report(args: argparse.Namespace) -> int:
    table = report(args.runs)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.out, table.encode("utf-8"))
    print(table, end="")
    return 0


COMMANDS: dict[str, Command] = {
    "run": Command(
        "answer a benchmark's questions with a checkpoint (LLaVA answers file)", add_run_arguments, run_run
    ),
    "score": Command(
        "score an answers file against a benchmark's annotations", add_score_arguments, run_score
    ),
    "report": Command("one markdown table of several runs' scores", add_report_arguments, run_report),
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m mllm_kd.eval", description="Benchmark evaluation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        cmd.add_arguments(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reuse_freed_memory()  # glibc keeps freed large blocks for the next batch (mllm_kd/runtime/allocator.py)
    try:
        return COMMANDS[args.command].run(args)
    except MllmKdError as e:
        return exit_code(e)
