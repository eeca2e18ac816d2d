"""The command-line options the easy-VQA demo and its ablation share: the run's size and the seed lists."""

from __future__ import annotations

import argparse

SIZE_FLAGS = ("--questions", "--captions", "--student-questions")


def add_size_options(p: argparse.ArgumentParser) -> None:
    """``--questions``, ``--captions`` and ``--student-questions``: the run's size (the demo's and its
    ablations'), in the order of :data:`SIZE_FLAGS`."""
    p.add_argument(
        "--questions",
        type=int,
        default=None,
        help="training questions of every model's SFT/DFT stages (default: the recipe's); a size option",
    )
    p.add_argument(
        "--captions",
        type=int,
        default=None,
        help="captions of the pre-training stages (default: the recipe's)",
    )
    p.add_argument(
        "--student-questions",
        type=int,
        default=None,
        help="training questions of the students' SFT/DFT stages alone: the first N of the training "
        "questions, of which the teacher's are the first --questions (default: --questions, else the recipe's)",
    )


def size_overrides(
    questions: int | None, captions: int | None, student_questions: int | None = None
) -> list[str]:
    """The stage overrides of the size options (None: the recipe's); ``student_questions`` comes last, so it
    wins over ``questions`` for the students' stages."""
    return [
        f"stages.{stage}.data.max_samples={n}"
        for n, stages in (
            (questions, ("teacher_sft", "stage2", "stage3")),
            (captions, ("teacher_pt", "stage1")),
            (student_questions, ("stage2", "stage3")),
        )
        if n is not None
        for stage in stages
    ]


def seed_list(text: str) -> tuple[int, ...]:
    """``--seeds``: distinct comma-separated integers, e.g. ``0,1``."""
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct seeds, got {text!r}")
    return seeds
