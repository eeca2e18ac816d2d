"""Which easy-VQA questions and images a conversion uses, and the records made from them.

:class:`Selection` splits the package's train images into train and held-out validation images, picks
the test questions (a prefix, or a fixed stratified sample), and computes the labels, caption and
instruct records and the source digests lazily, when an artifact of :mod:`mllm_kd.data_prep.easyvqa`
needs them.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from mllm_kd.data_prep.easyvqa_questions import (
    Label,
    Question,
    balanced_yes_no,
    caption_record,
    instruct_records_of_image,
    load_split,
    recover_labels,
    stratified_sample,
)
from mllm_kd.data_prep.llava_format import Record, json_bytes
from mllm_kd.errors import ConfigError

__all__ = ["Selection", "source_digest"]


def source_digest(questions: list[Question], image_paths: dict[int, Path]) -> str:
    """SHA-256 of the selected questions and the bytes of the selected images."""
    digest = hashlib.sha256(json_bytes([[q.index, q.text, q.answer, q.image_id] for q in questions]))
    for image_id, path in sorted(image_paths.items()):
        digest.update(image_id.to_bytes(8, "little") + path.read_bytes())
    return digest.hexdigest()


@dataclass
class Selection:
    """The selected subset of easy-VQA; labels and records are computed only when an artifact needs them."""

    max_train_images: int | None
    max_test_questions: int | None
    questions_per_record: int | None
    balance: bool
    val_images: int = 0
    shuffle: bool = False
    test_sample: int | None = None
    describe_yes_no: bool = False  # yes/no answers say first what the image shows ("blue circle, no")
    check_yes_no: bool = False  # and then what the question asks about ("blue circle, red absent, no")
    train_questions: list[Question] = field(init=False)
    train_images: dict[int, Path] = field(init=False)
    test_questions: list[Question] = field(init=False)
    test_images: dict[int, Path] = field(init=False)
    val_questions: list[Question] = field(init=False)
    val_image_paths: dict[int, Path] = field(init=False)

    def __post_init__(self) -> None:
        questions, paths = load_split("train")
        kept_ids = sorted(paths)[: self.max_train_images]
        if self.val_images >= len(kept_ids):
            raise ConfigError(
                f"val_images={self.val_images} leaves no train images (of {len(kept_ids)} kept)"
            )
        val_ids = set(kept_ids[len(kept_ids) - self.val_images :])
        self.train_images = {i: paths[i] for i in kept_ids if i not in val_ids}
        self.train_questions = [q for q in questions if q.image_id in self.train_images]
        self.val_image_paths = {i: paths[i] for i in sorted(val_ids)}
        self.val_questions = sorted(
            (q for q in questions if q.image_id in val_ids), key=lambda q: (q.image_id, q.index)
        )
        questions, paths = load_split("test")
        questions = sorted(questions, key=lambda q: (q.image_id, q.index))[: self.max_test_questions]
        if self.test_sample is not None:
            questions = stratified_sample(questions, self.test_sample)
        self.test_questions = questions
        self.test_images = {i: paths[i] for i in sorted({q.image_id for q in questions})}

    @cached_property
    def train_digest(self) -> str:
        return source_digest(self.train_questions, self.train_images)

    @cached_property
    def test_digest(self) -> str:
        return source_digest(self.test_questions, self.test_images)

    @cached_property
    def labels(self) -> tuple[dict[int, Label], dict[str, int]]:
        return recover_labels(self.train_questions, self.train_images)

    @cached_property
    def caption_records(self) -> list[Record]:
        labels, _ = self.labels
        return [caption_record(i, labels[i]) for i in sorted(self.train_images)]

    @cached_property
    def instruct_records(self) -> list[Record]:
        by_image: dict[int, list[Question]] = {}
        for q in balanced_yes_no(self.train_questions) if self.balance else self.train_questions:
            by_image.setdefault(q.image_id, []).append(q)
        labels = self.labels[0] if self.describe_yes_no or self.check_yes_no else {}
        # An image without questions gets no instruct record (none in the package's data).
        records = [
            record
            for i in sorted(self.train_images)
            if i in by_image
            for record in instruct_records_of_image(
                i, by_image[i], self.questions_per_record, labels.get(i), self.check_yes_no
            )
        ]
        if self.shuffle:
            random.Random("easyvqa-instruct-order").shuffle(records)
        return records
