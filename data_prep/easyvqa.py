"""Convert the easy-VQA data set (the ``easy-vqa`` PyPI package) into the pipeline's training formats.

(:func:`prepare_easyvqa` is one ordered list of artifacts, each rebuilt only when its inputs changed,
:mod:`mllm_kd.data_prep.artifacts`; which questions and images are used is
:mod:`mllm_kd.data_prep.easyvqa_selection`; the questions, labels and records are
:mod:`mllm_kd.data_prep.easyvqa_questions`.)

easy-VQA: 64x64 RGB images of one coloured shape (circle, rectangle or triangle in one of 8 colours) on
a light plain background; 4,000 train images with 38,575 questions and 1,000 test images with 9,673
questions; 13 one-word answers (3 shapes, 8 colours, yes, no). The package ships the images as PNGs and
the questions as ``[question, answer, image_id]`` triples; nothing is downloaded.

Usage::

    python -m mllm_kd.data_prep.easyvqa --out DIR [--max-train-images N] [--max-test-questions N]
        [--shard-size N] [--vocab-size N] [--questions-per-record N] [--balance-yes-no] [--shuffle]
        [--describe-yes-no] [--check-yes-no] [--force]

or :func:`prepare_easyvqa` from Python. The subset options keep the first N train images by id and the
first N test questions in (image id, file position) order, so a subset is deterministic.

Output under DIR (image paths in records are relative to ``DIR/images``):

``images/train/<id>.png``, ``images/test/<id>.png``
    The package's PNGs, copied byte for byte (test: only images that a kept test question uses).
``captions.json``
    LLaVA list, one record per train image: ``{"id": "caption-<id>", "image": "train/<id>.png",
    "conversations": [{"from": "human", "value": "<image>\\n<caption instruction>"}, {"from": "gpt",
    "value": "<caption>"}]}``; e.g. "The image shows a red circle on a plain background.". Instructions
    and caption templates vary, chosen per image with a seeded RNG.
``instruct.json``
    LLaVA list of short-answer records: ``{"id": "instruct-<id>-<part>", "image": ...,
    "conversations": [...]}``, each question a human turn ``"<question>\\n" + SHORT_ANSWER_PROMPT`` (the
    first prefixed with ``"<image>\\n"``), each answer a gpt turn. ``--questions-per-record N`` (default 1)
    puts N of an image's questions (file order) in one multi-turn record; 0 puts all of them in one
    record ``instruct-<id>``. One question per record is the default because the test asks one question
    at a time: in a multi-turn record the later answers can be read off the earlier ones, and a model
    trained that way answers yes/no test questions from priors (measured: 66.7% on yes/no with whole-image
    records, against the single-question recipe's figure in the README). ``--balance-yes-no`` keeps,
    per yes/no question template, as many "yes" as "no" train questions (:func:`balanced_yes_no`).
    ``--shuffle`` writes the records in a seeded random order (the same on every machine) instead of by
    image id, so that any prefix (``data.max_samples``) is a uniform sample of the questions and images.
    ``--describe-yes-no`` makes each yes/no answer say first what the image shows: "is there not a red
    shape?" -> "blue rectangle, yes" (:func:`~mllm_kd.data_prep.easyvqa_questions.described_answer`);
    ``--check-yes-no`` adds the step to the answer, "blue rectangle, red absent, yes"; scoring reads the
    word after the last comma (:func:`mllm_kd.eval.tasks.easyvqa.final_answer`). Colour, shape and test files are unchanged.
``test_questions.jsonl``
    LLaVA question file: per line ``{"question_id": "<index in the package's test list>", "image":
    "test/<id>.png", "text": "<question>\\n" + SHORT_ANSWER_PROMPT, "category": <type>}``.
``test_answers.json``
    ``{question_id: {"answer": str, "type": "shape" | "color" | "yes/no"}}``, the type from the answer.
``wds/captions-%05d.tar``, ``wds/instruct-%05d.tar``
    WebDataset shards of the same records, ``--shard-size`` samples per shard (default 1000). Sample
    schema: ``__key__`` = the record id sanitised for WebDataset (letters, digits, ``-``, ``_``; never a
    dot), ``json`` = the UTF-8 JSON of the record exactly as in the JSON file (``id``, ``image``,
    ``conversations``), ``png`` = the image's PNG bytes. (The pipeline's reader also accepts ``jpg``
    instead of ``png``, and no image key at all for text-only samples; this converter always writes
    ``png``.) Tar member times are fixed, so identical inputs give identical shards.
``tokenizer/``
    A byte-level BPE with the ChatML template (:func:`mllm_kd.model.tokenization.train_bpe_tokenizer`) trained
    on the train conversations as the chat template presents them: ``"<role>\\n<content>"`` for the roles
    user, assistant and system, the ``<image>`` placeholder removed (it is a special token). Vocabulary
    size: ``--vocab-size`` 1024 by default, an upper bound that the corpus does not reach: it has under
    100 distinct words, and BPE stops once every word is a single token (byte-level BPE never merges
    across words), at 556 tokens for the full train set (and for a 200-image subset). So every answer
    is one token both bare (``"circle"``, how an assistant reply starts) and after a space (``" circle"``,
    inside captions and questions; ``" yes"`` never occurs), as is every question word. 512 would
    leave some answers split on small subsets (e.g. ``"green"`` with 200 images), which makes
    short-answer scoring and answer-logit distillation less direct; the real size is printed and
    recorded in the manifest, with how many of the 13 answers encode as a single token.
``manifest.json``
    Arguments, source digests, counts, and per artifact its inputs key and a SHA-256 of its files; the
    ``content_hash`` combines those.

Idempotency (:func:`mllm_kd.data_prep.artifacts.build_artifacts`): an artifact is skipped when its
recorded inputs key (format version, relevant arguments, digest of the source questions and images)
matches and its files on disk still hash to the recorded value; otherwise its old files are removed and
it is rebuilt. ``--force`` rebuilds everything. Bump :data:`FORMAT_VERSION` whenever the output for
unchanged inputs changes (templates, formats).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from mllm_kd.atomic import atomic_write_bytes
from mllm_kd.data.records import validate_record
from mllm_kd.data_prep.artifacts import Artifact, build_artifacts, files_named, files_under
from mllm_kd.data_prep.easyvqa_questions import (
    ANSWER_TYPES,
    COLORS,
    SHAPES,
    YES_NO,
    Question,
    question_type,
)
from mllm_kd.data_prep.easyvqa_selection import Selection
from mllm_kd.data_prep.llava_format import (
    IMAGE_PLACEHOLDER,
    Record,
    json_bytes,
    short_answer_question,
    write_wds_shards,
)
from mllm_kd.errors import ArgumentParser, ConfigError, MllmKdError

__all__ = ["FORMAT_VERSION", "main", "prepare_easyvqa"]

# Bump when the output for the same inputs changes; reruns then rebuild instead of skipping.
FORMAT_VERSION = 2  # 2: validation split (val_images) and the stratified test sample
DEFAULT_SHARD_SIZE = 1000
DEFAULT_VOCAB_SIZE = 1024
T = TypeVar("T")
# One question per instruct record, as the test questions are asked: in a multi-turn record the later
# answers can be read off the earlier ones ("what color is the shape?" -> "blue", then "is there not a
# blue shape?"), a shortcut the model then leans on and that a single test question does not offer.
DEFAULT_QUESTIONS_PER_RECORD: int | None = 1


def _copy_images(images: dict[int, Path], dest: Path, progress: bool) -> dict[str, Any]:
    dest.mkdir(parents=True, exist_ok=True)
    for image_id, src in _bar(images.items(), len(images), f"copying {dest.name} images", "img", progress):
        shutil.copyfile(src, dest / f"{image_id}.png")
    return {"images": len(images)}


def _bar(items: Iterable[T], total: int, desc: str, unit: str, enabled: bool) -> Iterable[T]:
    """``items`` with a progress bar (count, rate, time left) on stderr when ``enabled``."""
    from tqdm.auto import tqdm

    return tqdm(
        items, total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=False
    )


def _write_records(path: Path, records: list[Record]) -> None:
    for record in records:
        validate_record(record, str(path))
    atomic_write_bytes(path, json_bytes(records))


def _shard_samples(records: list[Record], images_dir: Path) -> Iterator[tuple[Record, bytes, str]]:
    for record in records:
        yield record, (images_dir / record["image"]).read_bytes(), "png"


def _tokenizer_texts(records: list[Record]) -> Iterator[str]:
    """The text of each chat turn as the tokenizer sees it between ChatML special tokens."""
    role = {"human": "user", "gpt": "assistant"}
    for record in records:
        # No system turn in the data, but the template can emit one; the role name needs its tokens.
        yield "system\n"
        for turn in record["conversations"]:
            content = turn["value"].replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "")
            yield f"{role[turn['from']]}\n{content}"


def _train_tokenizer(records: list[Record], out: Path, vocab_size: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from mllm_kd.model.tokenization import train_bpe_tokenizer

    texts = list(_tokenizer_texts(records))
    train_bpe_tokenizer(texts, out, vocab_size=vocab_size)
    tok = AutoTokenizer.from_pretrained(str(out))
    answers = (*SHAPES, *COLORS, *YES_NO)
    single = sum(len(tok.encode(a, add_special_tokens=False)) == 1 for a in answers)
    single_spaced = sum(len(tok.encode(" " + a, add_special_tokens=False)) == 1 for a in answers)
    return {
        "vocab_size": len(tok),
        "training_texts": len(texts),
        "answers": len(answers),
        "single_token_answers": single,
        "single_token_answers_with_space": single_spaced,
    }


def prepare_easyvqa(
    out_dir: str | Path,
    max_train_images: int | None = None,
    max_test_questions: int | None = None,
    force: bool = False,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    questions_per_record: int | None = DEFAULT_QUESTIONS_PER_RECORD,
    balance_yes_no: bool = False,
    val_images: int = 0,
    test_sample: int | None = None,
    shuffle: bool = False,
    describe_yes_no: bool = False,
    check_yes_no: bool = False,
    log: Callable[[str], None] | None = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the easy-VQA outputs (module docstring) under ``out_dir``; skip what is up to date.

    Returns the manifest plus ``"actions"`` ({artifact: "wrote" | "skipped"}) and ``"paths"``
    (absolute paths of the outputs). ``log`` gets one line per artifact (None: silent); ``progress``
    shows a bar with the time left while images are copied and shards written.
    """
    for name, value in (("max_train_images", max_train_images), ("max_test_questions", max_test_questions)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1 (or None for all), got {value}")
    if shard_size < 1:
        raise ConfigError(f"shard_size must be >= 1, got {shard_size}")
    if questions_per_record is not None and questions_per_record < 1:
        raise ConfigError(f"questions_per_record must be >= 1 (or None for all), got {questions_per_record}")
    if vocab_size < 300:
        # 256 byte tokens + 4 special tokens leave no room for merges below this.
        raise ConfigError(f"vocab_size must be >= 300, got {vocab_size}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    emit = log or (lambda _line: None)
    started = time.perf_counter()

    if val_images < 0:
        raise ConfigError(f"val_images must be >= 0, got {val_images}")
    source = Selection(
        max_train_images,
        max_test_questions,
        questions_per_record,
        balance_yes_no,
        val_images=val_images,
        test_sample=test_sample,
        shuffle=shuffle,
        describe_yes_no=describe_yes_no,
        check_yes_no=check_yes_no,
    )
    images = out / "images"
    wds_dir = out / "wds"
    paths = {
        "images_train": images / "train",
        "images_test": images / "test",
        "captions": out / "captions.json",
        "instruct": out / "instruct.json",
        "test_questions": out / "test_questions.jsonl",
        "test_answers": out / "test_answers.json",
        "val_questions": out / "val_questions.jsonl",
        "val_answers": out / "val_answers.json",
        "wds_captions": wds_dir / "captions-%05d.tar",
        "wds_instruct": wds_dir / "instruct-%05d.tar",
        "tokenizer": out / "tokenizer",
        "manifest": out / "manifest.json",
    }

    def build_captions() -> dict[str, Any]:
        _write_records(paths["captions"], source.caption_records)
        _, stats = source.labels
        return {"records": len(source.caption_records), **{f"labels_{k}": v for k, v in stats.items()}}

    def build_instruct() -> dict[str, Any]:
        records = source.instruct_records
        _write_records(paths["instruct"], records)
        return {"records": len(records), "turns": sum(len(r["conversations"]) // 2 for r in records)}

    def build_questions(split: str, questions: list[Question], folder: str) -> dict[str, Any]:
        lines, answers = [], {}
        for q in questions:
            qid, kind = str(q.index), question_type(q.answer)
            lines.append(
                json_bytes(
                    {
                        "question_id": qid,
                        "image": f"{folder}/{q.image_id}.png",
                        "text": short_answer_question(q.text),
                        "category": kind,
                    }
                )
            )
            answers[qid] = {"answer": q.answer, "type": kind}
        atomic_write_bytes(paths[f"{split}_questions"], b"".join(line + b"\n" for line in lines))
        atomic_write_bytes(paths[f"{split}_answers"], json_bytes(answers))
        types = Counter(a["type"] for a in answers.values())
        return {"questions": len(answers), **{f"type_{t}": types[t] for t in ANSWER_TYPES}}

    def build_shards(kind: str, records: list[Record]) -> dict[str, Any]:
        samples = _bar(
            _shard_samples(records, images), len(records), f"writing {kind} shards", "sample", progress
        )
        shards = write_wds_shards(samples, paths[f"wds_{kind}"], shard_size)
        return {"shards": len(shards), "samples": len(records)}

    train_args = {"max_train_images": max_train_images, "val_images": val_images, "source": "train"}
    instruct_args = {
        **train_args,
        "questions_per_record": questions_per_record,
        "balance_yes_no": balance_yes_no,
        "shuffle": shuffle,
        # only when set, so that directories written before the option still count as up to date
        **({"describe_yes_no": True} if describe_yes_no else {}),
        **({"check_yes_no": True} if check_yes_no else {}),
    }
    test_args = {"max_test_questions": max_test_questions, "test_sample": test_sample, "source": "test"}
    artifacts = [
        Artifact(
            "images_train",
            "images/train/",
            train_args,
            files_under(paths["images_train"], "*.png"),
            lambda: _copy_images(
                {**source.train_images, **source.val_image_paths}, paths["images_train"], progress
            ),
        ),
        Artifact(
            "images_test",
            "images/test/",
            test_args,
            files_under(paths["images_test"], "*.png"),
            lambda: _copy_images(source.test_images, paths["images_test"], progress),
        ),
        Artifact("captions", "captions.json", train_args, files_named(paths["captions"]), build_captions),
        Artifact("instruct", "instruct.json", instruct_args, files_named(paths["instruct"]), build_instruct),
        Artifact(
            "test",
            "test_questions.jsonl + test_answers.json",
            test_args,
            files_named(paths["test_questions"], paths["test_answers"]),
            lambda: build_questions("test", source.test_questions, "test"),
        ),
        Artifact(
            "val",
            "val_questions.jsonl + val_answers.json (held-out train images)",
            train_args,
            files_named(paths["val_questions"], paths["val_answers"]),
            lambda: build_questions("val", source.val_questions, "train"),
        ),
        Artifact(
            "wds_captions",
            "wds/captions-*.tar",
            {**train_args, "shard_size": shard_size},
            files_under(wds_dir, "captions-*.tar"),
            lambda: build_shards("captions", source.caption_records),
        ),
        Artifact(
            "wds_instruct",
            "wds/instruct-*.tar",
            {**instruct_args, "shard_size": shard_size},
            files_under(wds_dir, "instruct-*.tar"),
            lambda: build_shards("instruct", source.instruct_records),
        ),
        Artifact(
            "tokenizer",
            "tokenizer/",
            {**instruct_args, "vocab_size": vocab_size},
            files_under(paths["tokenizer"], "*"),
            lambda: _train_tokenizer(
                source.caption_records + source.instruct_records, paths["tokenizer"], vocab_size
            ),
        ),
    ]

    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "converter": "mllm_kd.data_prep.easyvqa",
        "args": {
            "max_train_images": max_train_images,
            "max_test_questions": max_test_questions,
            "shard_size": shard_size,
            "vocab_size": vocab_size,
            "questions_per_record": questions_per_record,
            "balance_yes_no": balance_yes_no,
            "val_images": val_images,
            "test_sample": test_sample,
            "shuffle": shuffle,
            "describe_yes_no": describe_yes_no,
            "check_yes_no": check_yes_no,
        },
        "source": {"package": "easy-vqa", "package_version": _package_version()},
        "counts": {},
        "artifacts": {},
        "content_hash": None,
    }
    digests = {"train": lambda: source.train_digest, "test": lambda: source.test_digest}
    actions = build_artifacts(
        out,
        paths["manifest"],
        manifest,
        artifacts,
        lambda name: digests[name](),
        FORMAT_VERSION,
        force=force,
        emit=emit,
    )
    tokenizer_counts = manifest["artifacts"]["tokenizer"]["counts"]
    emit(
        f"tokenizer vocab size {tokenizer_counts['vocab_size']} "
        f"({tokenizer_counts['single_token_answers']}/{tokenizer_counts['answers']} answers are one token)"
    )
    emit(f"manifest: {paths['manifest']}  ({time.perf_counter() - started:.1f}s)")
    return {**manifest, "actions": actions, "paths": {k: str(v) for k, v in paths.items()}}


def _package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("easy-vqa")
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for bad input)."""
    parser = ArgumentParser(
        prog="python -m mllm_kd.data_prep.easyvqa",
        description="Convert easy-VQA (from the easy-vqa package) to LLaVA JSON, WebDataset shards and a BPE tokenizer.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--max-train-images", type=int, default=None, help="keep the first N train images by id"
    )
    parser.add_argument(
        "--max-test-questions", type=int, default=None, help="keep the first N test questions (by image id)"
    )
    parser.add_argument(
        "--shard-size",
        "--shards-size",
        dest="shard_size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        help="samples per WebDataset shard",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="BPE tokenizer vocabulary size"
    )
    parser.add_argument(
        "--questions-per-record",
        type=int,
        default=DEFAULT_QUESTIONS_PER_RECORD,
        help="questions of one image per instruct record (default 1, as the test asks them); 0: all of them",
    )
    parser.add_argument(
        "--balance-yes-no",
        action="store_true",
        help="subsample train yes/no questions to as many yes as no per question template",
    )
    parser.add_argument(
        "--val-images",
        type=int,
        default=0,
        help="hold out the last N kept train images as a validation split (val_questions.jsonl)",
    )
    parser.add_argument(
        "--test-sample",
        type=int,
        default=None,
        help="score a fixed stratified sample of N test questions (each answer type in its share)",
    )
    parser.add_argument(
        "--shuffle",
        action="store_true",
        help="instruct records in a seeded random order (any prefix is a uniform sample) instead of by image",
    )
    parser.add_argument(
        "--describe-yes-no",
        action="store_true",
        help='yes/no answers say first what the image shows ("blue rectangle, yes"); scored on the last word',
    )
    parser.add_argument(
        "--check-yes-no",
        action="store_true",
        help="described yes/no answers with the step to the answer: what the question asks about and whether "
        'the image has it ("blue rectangle, red absent, yes"); scored on the last word',
    )
    parser.add_argument("--force", action="store_true", help="rebuild everything even if up to date")
    args = parser.parse_args(argv)
    try:
        prepare_easyvqa(
            args.out,
            max_train_images=args.max_train_images,
            max_test_questions=args.max_test_questions,
            force=args.force,
            shard_size=args.shard_size,
            vocab_size=args.vocab_size,
            questions_per_record=args.questions_per_record or None,
            balance_yes_no=args.balance_yes_no,
            val_images=args.val_images,
            test_sample=args.test_sample,
            shuffle=args.shuffle,
            describe_yes_no=args.describe_yes_no,
            check_yes_no=args.check_yes_no,
        )
    except MllmKdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
