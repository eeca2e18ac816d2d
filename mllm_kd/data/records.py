"""LLaVA-format records: the one validator, and the JSON reader.

Input formats (``data.format``):

* ``llava_json``: a JSON list of ``{"id", "image" (a path, a list of paths, or absent), "conversations":
  [{"from": "human"|"gpt", "value": str}, ...]}`` with ``<image>`` placeholders in the text, and an
  image folder the paths are relative to.
* ``wds``: WebDataset shards whose samples hold ``json`` (the same record without the image path) and
  the image bytes under ``png``/``jpg``/``jpeg``/``webp`` (absent for text-only samples).
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from mllm_kd.config import DataConfig
from mllm_kd.errors import DataError

IMAGE_TOKEN = "<image>"  # the placeholder in the text; the tokenizer gets it as a special token
ROLES = {"human": "user", "gpt": "assistant"}
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
# open_image refuses every image over PIL.Image.MAX_IMAGE_PIXELS with a DataError naming it, so PIL's
# warning at that size would only add lines to the error output.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def image_prompt(question: str) -> str:
    """The prompt for a question about one image: ``<image>`` then the question, unless the question already
    places its ``<image>`` (LLaVA's ``model_vqa`` convention), e.g. after the question text."""
    return question if IMAGE_TOKEN in question else f"{IMAGE_TOKEN}\n{question}"


# ---------------------------------------------------------------------------------------------- images
@contextmanager
def open_image(source: str | Path | bytes, where: str) -> Iterator[Image.Image]:
    """``PIL.Image.open`` that turns every way an image can be unreadable into a :class:`DataError` naming
    ``where``: not an image, truncated, empty, or larger than ``PIL.Image.MAX_IMAGE_PIXELS`` (a
    decompression bomb: refused from its header, before any pixel is decoded)."""
    if isinstance(source, bytes) and not source:
        raise DataError(f"{where}: the image is empty (0 bytes)")
    if not isinstance(source, bytes) and Path(source).is_file() and Path(source).stat().st_size == 0:
        raise DataError(f"{where}: the image file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and im.width * im.height > limit:
                raise DataError(
                    f"{where}: the image is {im.width}x{im.height} pixels, more than PIL.Image.MAX_IMAGE_PIXELS "
                    f"({limit}): a decompression bomb or a mistake; resize it (or raise the limit)"
                )
            yield im
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: cannot read image: {e}") from e


# ------------------------------------------------------------------------------------------ validation
def validate_record(rec: Any, where: str) -> None:
    """Check one LLaVA record's structure; raise :class:`DataError` naming ``where`` and the sample id."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a sample must be a JSON object, got {type(rec).__name__}")
    sid = rec.get("id", "<no id>")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: sample {sid!r} has no 'conversations' list")
    for i, turn in enumerate(conv):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("value"), str)
            or not isinstance(turn.get("from"), str)  # a list or dict role is malformed, not a TypeError
            or turn["from"] not in ROLES
        ):
            raise DataError(
                f"{where}: sample {sid!r} turn {i} is malformed: expected {{'from': 'human'|'gpt', 'value': str}}, got {turn!r:.120}"
            )
        expected = "human" if i % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise DataError(
                f"{where}: sample {sid!r} turn {i} is from {turn['from']!r}; turns must alternate human/gpt starting with human"
            )
    if conv[-1]["from"] != "gpt":
        raise DataError(f"{where}: sample {sid!r} ends with a human turn that has no answer")
    n_placeholders = sum(t["value"].count(IMAGE_TOKEN) for t in conv)
    try:
        n_images = len(record_images(rec))
    except DataError as e:
        raise DataError(f"{where}: {e}") from e
    if n_placeholders != n_images:
        raise DataError(
            f"{where}: sample {sid!r} has {n_placeholders} {IMAGE_TOKEN} placeholders but {n_images} images"
        )
    if any(IMAGE_TOKEN in t["value"] for t in conv if t["from"] == "gpt"):
        raise DataError(f"{where}: sample {sid!r} has an {IMAGE_TOKEN} placeholder in an answer")


def record_images(rec: dict) -> list[str]:
    """The image names of a record: ``image`` as a string or a list of strings (none when absent)."""
    image = rec.get("image")
    if image is None:
        return list(rec.get("_image_keys", []))
    images = [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise DataError(
            f"sample {rec.get('id', '<no id>')!r}: 'image' must be a path or a list of paths, got {image!r:.80}"
        )
    return images


def load_llava_json(cfg: DataConfig) -> list[dict]:
    """Load and validate a LLaVA JSON file and its image folder (preflight; nothing is written)."""
    if not cfg.path:
        raise DataError("data.path is not set")
    path = Path(cfg.path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist (data.path)")
    try:
        records = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text: {e}") from e
    except json.JSONDecodeError as e:
        raise DataError(f"data file {path} is not valid JSON: {e}") from e
    if not isinstance(records, list):
        raise DataError(f"data file {path} must hold a JSON list of samples")
    if cfg.max_samples is not None:
        records = records[: cfg.max_samples]
    if not records:
        raise DataError(f"data file {path} holds no samples")
    folder = Path(cfg.image_folder) if cfg.image_folder else path.parent
    checked: set[str] = set()  # images shared by several samples are checked once
    for i, rec in enumerate(records):
        validate_record(rec, f"{path} sample #{i}")
        for name in record_images(rec):
            if name in checked:
                continue
            checked.add(name)
            image_path = folder / name
            if not image_path.is_file():
                raise DataError(f"{path}: sample {rec.get('id')!r}: image {image_path} does not exist")
            if cfg.verify_images:
                where = f"{path}: sample {rec.get('id')!r}: image {image_path} is corrupt"
                with open_image(image_path, where) as im:
                    try:
                        im.verify()
                    except (OSError, SyntaxError) as e:
                        raise DataError(f"{where}: {e}") from e
    return records
