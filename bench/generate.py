"""Greedy answering with and without the shared-prefix KV cache (``Generator.prefix_cache``), side by side.

One checkpoint answers the first ``--questions`` questions of a LLaVA question file through
``mllm_kd.model.generate.answer_file`` (the demo's and ``python -m mllm_kd.eval run``'s loop), both ways in
alternating order ``--repeats`` times in one process; prints each way's seconds and how many answers agree,
then a JSON line. For example, on the easy-VQA demo's student after ``make demo``:

    python bench/generate.py --checkpoint runs/demo/seed0/kd/stage3 --data runs/demo/data --questions 768
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mllm_kd.checkpoint.generator import checkpoint_generator
from mllm_kd.model.generate import answer_file, read_questions
from mllm_kd.runtime.allocator import reuse_freed_memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint or finished stage directory")
    p.add_argument("--data", required=True, help="a folder with <split>_questions.jsonl and images/")
    p.add_argument("--split", default="test")
    p.add_argument("--questions", type=int, default=768)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    reuse_freed_memory()  # as the command-line entry points run
    data = Path(args.data)
    gen = checkpoint_generator(args.checkpoint, torch.device("cpu"), max_new_tokens=args.max_new_tokens)
    questions = read_questions(data / f"{args.split}_questions.jsonl")[: args.questions]
    seconds: dict[bool, list[float]] = {False: [], True: []}
    answers: dict[bool, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for cached in (False, True):
                gen.prefix_cache = cached
                out = Path(tmp) / f"{cached}.jsonl"
                out.unlink(missing_ok=True)
                start = time.perf_counter()
                answer_file(gen, questions, data / "images", out, "bench", args.batch_size, progress=False)
                seconds[cached].append(round(time.perf_counter() - start, 2))
                answers[cached] = {
                    (r := json.loads(line))["question_id"]: r["text"] for line in out.read_text().splitlines()
                }
    same = sum(answers[True][q] == a for q, a in answers[False].items())
    print(f"without the prefix cache: {seconds[False]} s; with it: {seconds[True]} s")
    print(f"answers the same: {same} of {len(answers[False])}")
    print(
        json.dumps(
            {
                "questions": len(questions),
                "seconds_without": seconds[False],
                "seconds_with": seconds[True],
                "time_ratio": round(statistics.median(seconds[True]) / statistics.median(seconds[False]), 3),
                "same_answers": same,
            }
        )
    )


if __name__ == "__main__":
    main()
