"""easy-VQA's questions and labels: answer types, the shape and colour of each image, the records built
from them, the yes/no template prior and the stratified test sample. :mod:`mllm_kd.data_prep.easyvqa`
writes them out.

Labels for captions: easy-VQA has no per-image label file, so colour and shape come from the questions.
A "what shape/colour ..." answer gives one of them (and the colour or shape named in the question
gives the other); yes/no questions ("is there not a red shape?") narrow the candidates. That settles
about 90% of the train images. For the rest the pixels decide: shapes are painted in exact CSS colours
(the palette below) and a shape's fill of its bounding box separates triangles (~0.5), circles (~0.8)
and rectangles (~1.0). The pixel verdict must agree with every question about the image; on the
package's data it also agrees with all question-determined labels (counted in the manifest).
"""

from __future__ import annotations

import functools
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageChops

from mllm_kd.data_prep.llava_format import (
    Record,
    make_conversation,
    short_answer_question,
)
from mllm_kd.errors import ConfigError, DataError

SHAPES = ("circle", "rectangle", "triangle")
# easy-VQA paints shapes in these exact (CSS) colours; note "green" is CSS lime, not CSS green.
COLORS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "blue": (0, 0, 255),
    "brown": (165, 42, 42),
    "gray": (128, 128, 128),
    "green": (0, 255, 0),
    "red": (255, 0, 0),
    "teal": (0, 128, 128),
    "yellow": (255, 255, 0),
}
YES_NO = ("yes", "no")
ANSWER_TYPES = ("shape", "color", "yes/no")
_COLOR_BY_RGB = {rgb: name for name, rgb in COLORS.items()}

# Bounding-box fill ratios measured on all question-labelled images: triangles 0.50-0.66, circles
# 0.74-0.91, rectangles 0.95-1.0 (antialiased edges blur them); the cuts sit in the gaps.
_TRIANGLE_MAX_FILL = 0.70
_CIRCLE_MAX_FILL = 0.93

# The brief-description instructions of LLaVA's caption pretraining data (LCS-558K).
CAPTION_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)
CAPTION_TEMPLATES = (
    "{A} {color} {shape}.",
    "{A} {color} {shape} on a plain background.",
    "The image shows {a} {color} {shape} on a plain background.",
    "There is {a} {color} {shape} in the image.",
    "A picture of {a} {color} {shape}.",
    "{A} single {color} {shape} on a light background.",
)


@dataclass(frozen=True)
class Question:
    """One easy-VQA question; ``index`` is its position in the package's list for its split."""

    index: int
    text: str
    answer: str
    image_id: int


@dataclass(frozen=True)
class Label:
    """The colour and shape of a train image and where they came from ("questions" or "pixels")."""

    shape: str
    color: str
    source: str


def question_type(answer: str) -> str:
    """The answer type: "shape", "color" or "yes/no"; :class:`DataError` for anything else."""
    if answer in YES_NO:
        return "yes/no"
    if answer in SHAPES:
        return "shape"
    if answer in COLORS:
        return "color"
    raise DataError(f"unknown easy-VQA answer {answer!r} (expected a shape, a colour, yes or no)")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def named_words(text: str) -> list[str]:
    """The colour and shape words a question names, in its order."""
    return [w for w in _words(text) if w in SHAPES or w in COLORS]


def is_negated(text: str) -> bool:
    """Whether a yes/no question is negated ("is there not ...", "is no ...")."""
    words = _words(text)
    return "not" in words or "no" in words


def asked_about(text: str) -> tuple[set[str], set[str], bool]:
    """A question's named shapes and colours, and whether it is negated (:func:`is_negated`)."""
    named = named_words(text)
    return {w for w in named if w in SHAPES}, {w for w in named if w in COLORS}, is_negated(text)


def shows(named: list[str] | set[str], color: str, shape: str) -> bool:
    """Whether an image of ``color`` and ``shape`` has every named word (what a yes/no question asks)."""
    return all(w in (color, shape) for w in named)


def _question_constraints(
    questions: list[Question],
) -> dict[int, tuple[set[str], set[str]]]:
    """Per image id, the shapes and colours consistent with all its questions and answers."""
    candidates: dict[int, tuple[set[str], set[str]]] = {}
    for q in questions:
        shapes, colors = candidates.setdefault(q.image_id, (set(SHAPES), set(COLORS)))
        named_shapes, named_colors, negated = asked_about(q.text)
        kind = question_type(q.answer)
        if kind == "shape":
            # "what is the red shape?" -> rectangle: the answer is the shape, the named colour its colour.
            shapes &= {q.answer}
            colors.intersection_update(*({c} for c in named_colors))
        elif kind == "color":
            # "what color is the circle?" -> red
            colors &= {q.answer}
            shapes.intersection_update(*({s} for s in named_shapes))
        else:
            # "is there (not) a red shape (in the image)?", "is no circle present?", "does the image
            # (not) contain ...?": with a negation a "yes" means absent.
            present = (q.answer == "yes") != negated
            for named, pool in ((named_shapes, shapes), (named_colors, colors)):
                for word in named:
                    if present:
                        pool &= {word}
                    else:
                        pool.discard(word)
        if not shapes or not colors:
            raise DataError(
                f"image {q.image_id}: question {q.index} ({q.text!r} -> {q.answer!r}) contradicts the others"
            )
    return candidates


def classify_image_pixels(path: Path) -> tuple[str, str]:
    """(shape, colour) of an easy-VQA image from its pixels; :class:`DataError` if it has no palette colour."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    histogram = sorted(rgb.getcolors(rgb.width * rgb.height) or [], reverse=True)
    background = histogram[0][1]
    # Antialiased edges blend shape and background; the shape's own colour is the commonest exact
    # palette colour.
    painted = [(count, c) for count, c in histogram if c in _COLOR_BY_RGB and c != background]
    if not painted:
        raise DataError(f"{path}: no pixel has an easy-VQA shape colour")
    foreground = painted[0][1]
    diff = ImageChops.difference(rgb, Image.new("RGB", rgb.size, background))
    r, g, b = diff.split()
    distance = ImageChops.lighter(ImageChops.lighter(r, g), b)
    # A pixel belongs to the shape when it is more than halfway from the background to the shape colour.
    threshold = max(abs(x - y) for x, y in zip(foreground, background, strict=True)) / 2
    mask = distance.point(lambda v: 255 if v > threshold else 0)
    left, top, right, bottom = mask.getbbox() or (0, 0, 1, 1)
    fill = mask.histogram()[255] / ((right - left) * (bottom - top))
    if fill < _TRIANGLE_MAX_FILL:
        shape = "triangle"
    elif fill < _CIRCLE_MAX_FILL:
        shape = "circle"
    else:
        shape = "rectangle"
    return shape, _COLOR_BY_RGB[foreground]


def recover_labels(
    questions: list[Question], image_paths: dict[int, Path]
) -> tuple[dict[int, Label], dict[str, int]]:
    """Colour and shape of every image in ``image_paths`` (see the module docstring), and statistics.

    Raises :class:`DataError` when the questions contradict each other or the pixels contradict them.
    """
    candidates = _question_constraints([q for q in questions if q.image_id in image_paths])
    labels: dict[int, Label] = {}
    stats = Counter(from_questions=0, from_pixels=0, pixel_checked=0, pixel_disagreements=0)
    for image_id, path in sorted(image_paths.items()):
        shapes, colors = candidates.get(image_id, (set(SHAPES), set(COLORS)))
        pixel_shape, pixel_color = classify_image_pixels(path)
        if len(shapes) == 1 and len(colors) == 1:
            shape, color = next(iter(shapes)), next(iter(colors))
            labels[image_id] = Label(shape, color, "questions")
            stats["from_questions"] += 1
            stats["pixel_checked"] += 1
            # The questions are the data set's ground truth; a disagreement only flags the heuristic.
            stats["pixel_disagreements"] += (shape, color) != (pixel_shape, pixel_color)
            continue
        if pixel_shape not in shapes or pixel_color not in colors:
            raise DataError(
                f"image {image_id}: pixels say {pixel_color} {pixel_shape}, but its questions allow only "
                f"shapes {sorted(shapes)} and colours {sorted(colors)}"
            )
        labels[image_id] = Label(pixel_shape, pixel_color, "pixels")
        stats["from_pixels"] += 1
    return labels, dict(stats)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_record(image_id: int, label: Label) -> Record:
    """The caption record of a train image; instruction and template are seeded by the image id."""
    # A str seed is hashed with SHA-512 by `random`, so the choice is stable across runs and machines.
    rng = random.Random(f"easyvqa-caption-{image_id}")
    instruction = rng.choice(CAPTION_INSTRUCTIONS)
    a = _article(label.color)
    caption = rng.choice(CAPTION_TEMPLATES).format(
        a=a, A=a.capitalize(), color=label.color, shape=label.shape
    )
    return {
        "id": f"caption-{image_id}",
        "image": f"train/{image_id}.png",
        "conversations": make_conversation([(instruction, caption)]),
    }


def described_answer(question: Question, label: Label, checked: bool = False) -> str:
    """A yes/no answer preceded by what the image shows ("blue rectangle, yes"); other answers unchanged.

    The target of ``--describe-yes-no``: the answer is the word after the last comma, which
    :func:`mllm_kd.eval.tasks.easyvqa.final_answer` scores. ``checked`` (``--check-yes-no``) adds the step
    between description and answer: the words the question asks about and whether the image has them,
    "is there not a red shape?" -> "blue rectangle, red absent, yes".
    """
    if question.answer not in YES_NO:
        return question.answer
    if not checked:
        return f"{label.color} {label.shape}, {question.answer}"
    named, negated = named_words(question.text), is_negated(question.text)
    if not named:
        raise DataError(f"question {question.index} ({question.text!r}) names no colour or shape")
    present = shows(named, label.color, label.shape)
    if present != ((question.answer == "yes") != negated):
        raise DataError(
            f"question {question.index} ({question.text!r} -> {question.answer!r}) contradicts its image's "
            f"label {label.color} {label.shape}"
        )
    return f"{label.color} {label.shape}, {' '.join(named)} {'present' if present else 'absent'}, {question.answer}"


_DESCRIBED = re.compile(r"(\w+) (\w+), (?:[a-z ]+ (?:present|absent), )?(yes|no)\.?")


def parse_described(text: str) -> tuple[str, str, str] | None:
    """(colour, shape, answer) of a described answer, checked or not (:func:`described_answer`); None for
    any other text."""
    m = _DESCRIBED.fullmatch(text.strip().lower())
    return None if m is None else (m.group(1), m.group(2), m.group(3))


def instruct_record(
    image_id: int,
    questions: list[Question],
    part: int | None = None,
    label: Label | None = None,
    checked: bool = False,
) -> Record:
    """A short-answer record of a train image: its ``questions`` as turns, in file order.

    ``part`` numbers the records of one image when its questions are split (id ``instruct-<id>-<part>``);
    None gives the whole-image id ``instruct-<id>``. With the image's ``label``, yes/no answers say
    first what the image shows (:func:`described_answer`; ``checked``: and what the question asks about).
    """
    turns = [
        (short_answer_question(q.text), q.answer if label is None else described_answer(q, label, checked))
        for q in questions
    ]
    return {
        "id": f"instruct-{image_id}" if part is None else f"instruct-{image_id}-{part}",
        "image": f"train/{image_id}.png",
        "conversations": make_conversation(turns),
    }


def question_template(text: str) -> str:
    """The question with its colour and shape words replaced by ``{color}`` / ``{shape}``."""
    text = re.sub(rf"\b({'|'.join(COLORS)})\b", "{color}", text)
    return re.sub(rf"\b({'|'.join(SHAPES)})\b", "{shape}", text)


def balanced_yes_no(questions: list[Question]) -> list[Question]:
    """Keep, per yes/no question template, as many "yes" as "no" questions (file order kept).

    The more frequent answer of each template is subsampled (seeded, so the result is stable); other
    questions are all kept. easy-VQA's yes/no answers follow their template: "is there a red shape?"
    is "no" for 7 colours in 8, "is there not a red shape?" is "yes" as often, so a model can score
    82.5% on the test's yes/no questions without looking at the image. Balanced, it cannot.
    """
    groups: dict[tuple[str, str], list[int]] = {}
    for i, q in enumerate(questions):
        if q.answer in YES_NO:
            groups.setdefault((question_template(q.text), q.answer), []).append(i)
    rng = random.Random("easyvqa-balance-yes-no")
    dropped: set[int] = set()
    for template in sorted({t for t, _ in groups}):
        yes, no = groups.get((template, "yes"), []), groups.get((template, "no"), [])
        keep = min(len(yes), len(no))
        for indices in (yes, no):
            dropped.update(set(indices) - set(rng.sample(indices, keep)))
    return [q for i, q in enumerate(questions) if i not in dropped]


def template_prior(questions: list[Question]) -> dict[str, str]:
    """Per yes/no question template (:func:`question_template`), its majority answer in ``questions``.

    What a model that reads only the wording would answer; on the package's train questions this prior
    scores about 82.5% of the test's yes/no questions.
    """
    counts: dict[str, Counter] = {}
    for q in questions:
        if q.answer in YES_NO:
            counts.setdefault(question_template(q.text), Counter())[q.answer] += 1
    # ties (none in the package's data) go to "no", the more frequent answer overall
    return {t: max(YES_NO, key=lambda a: (c[a], a == "no")) for t, c in counts.items()}


@functools.cache
def train_template_prior() -> dict[str, str]:
    """:func:`template_prior` of the package's whole train split (whatever subset a run trains on)."""
    return template_prior(load_split("train")[0])


def stratified_sample(questions: list[Question], n: int) -> list[Question]:
    """A fixed sample of ``n`` questions with each answer type in its share of ``questions``.

    Per type, ``n * share`` rounded by largest remainder, drawn with a seeded RNG (the same sample on
    every machine); returned in (image id, index) order.
    """
    if not 1 <= n <= len(questions):
        raise ConfigError(f"test_sample={n} must be between 1 and the {len(questions)} test questions")
    by_type: dict[str, list[Question]] = {}
    for q in questions:
        by_type.setdefault(question_type(q.answer), []).append(q)
    quotas = {t: n * len(qs) / len(questions) for t, qs in by_type.items()}
    counts = {t: int(v) for t, v in quotas.items()}
    for t in sorted(quotas, key=lambda t: (counts[t] - quotas[t], t))[: n - sum(counts.values())]:
        counts[t] += 1
    rng = random.Random("easyvqa-test-sample")
    picked = [q for t in sorted(by_type) for q in rng.sample(by_type[t], counts[t])]
    return sorted(picked, key=lambda q: (q.image_id, q.index))


def instruct_records_of_image(
    image_id: int,
    questions: list[Question],
    questions_per_record: int | None,
    label: Label | None = None,
    checked: bool = False,
) -> list[Record]:
    """The image's questions (file order) in records of ``questions_per_record`` turns (None: one record);
    ``label``: yes/no answers described, ``checked`` with the step to the answer (:func:`instruct_record`)."""
    if questions_per_record is None:
        return [instruct_record(image_id, questions, label=label, checked=checked)]
    return [
        instruct_record(image_id, questions[start : start + questions_per_record], part, label, checked)
        for part, start in enumerate(range(0, len(questions), questions_per_record))
    ]


def load_split(split: str) -> tuple[list[Question], dict[int, Path]]:
    try:
        import easy_vqa
    except ImportError as exc:
        raise ConfigError(
            "the easy-VQA data comes from the `easy-vqa` package: pip install easy-vqa "
            "(or the project's [demo] extra)"
        ) from exc
    get_questions = easy_vqa.get_train_questions if split == "train" else easy_vqa.get_test_questions
    get_paths = easy_vqa.get_train_image_paths if split == "train" else easy_vqa.get_test_image_paths
    texts, answers, image_ids = get_questions()
    questions = [
        Question(i, text, answer, int(image_id))
        for i, (text, answer, image_id) in enumerate(zip(texts, answers, image_ids, strict=True))
    ]
    paths = {int(k): Path(v) for k, v in get_paths().items()}
    missing = sorted({q.image_id for q in questions} - set(paths))
    if missing:
        raise DataError(f"easy-VQA {split}: questions refer to missing images {missing[:10]}")
    return questions, paths
