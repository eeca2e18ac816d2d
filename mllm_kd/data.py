"""Training data: LLaVA-format conversations + images -> token ids, labels, pixel values.

Input formats (``data.format``):

* ``llava_json``: a JSON list of ``{"id", "image" (a path, a list of paths, or absent), "conversations":
  [{"from": "human"|"gpt", "value": str}, ...]}`` with ``<image>`` placeholders in the text, and an
  image folder the paths are relative to.
* ``wds``: WebDataset shards whose samples hold ``json`` (the same record without the image path) and
  the image bytes under ``png``/``jpg``/``jpeg``/``webp`` (absent for text-only samples).

Templates (``data.template``):

* ``chat``: the tokenizer's chat template (``human`` -> ``user``, ``gpt`` -> ``assistant``). Labels cover
  each assistant message and the template's end-of-turn tokens after it.
* ``plain`` (for tokenizers without a chat template)::

      [{system}\n\n]USER: {human}\nASSISTANT: {gpt}{eos}\nUSER: {human}\nASSISTANT: {gpt}{eos}\n...

  Labels cover ``{gpt}{eos}``.
* ``caption`` (stage-1 pre-training, LLaVA's "plain" pre-training format): the image tokens, then the
  caption (the first ``gpt`` turn) and EOS; the human instruction is dropped. Labels cover caption+EOS.
* ``auto``: ``chat`` when the tokenizer has a chat template, else ``plain``.

Every ``<image>`` becomes ``num_visual_tokens`` copies of the ``<image>`` token id; labels there are -100.
A sample longer than ``data.max_length`` is never cut through its visual tokens: it is skipped and
reported, or refused (``data.on_overflow``).
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset

from mllm_kd.config import DataConfig
from mllm_kd.errors import ConfigError, DataError
from mllm_kd.losses import IGNORE_INDEX
from mllm_kd.tokenization import IMAGE_TOKEN

log = logging.getLogger(__name__)
ROLES = {"human": "user", "gpt": "assistant"}
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


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
            or turn.get("from") not in ROLES
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
        records = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"data file {path} is not valid JSON: {e}") from e
    if not isinstance(records, list):
        raise DataError(f"data file {path} must hold a JSON list of samples")
    if cfg.max_samples is not None:
        records = records[: cfg.max_samples]
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
                try:
                    with Image.open(image_path) as im:
                        im.verify()
                except (UnidentifiedImageError, OSError, SyntaxError) as e:
                    raise DataError(
                        f"{path}: sample {rec.get('id')!r}: image {image_path} is corrupt: {e}"
                    ) from e
    return records


# ------------------------------------------------------------------------------------------- images
@dataclass
class ImageProcessor:
    """RGB, resize to a square ``size`` (bicubic), scale to [0, 1], normalise per channel."""

    size: int
    mean: list[float]
    std: list[float]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> ``[3, size, size]`` float32."""
        image = image.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)

    def load(self, source: str | Path | bytes, where: str) -> torch.Tensor:
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
                return self(im)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise DataError(f"{where}: cannot read image: {e}") from e


# -------------------------------------------------------------------------------------- tokenization
class ConversationEncoder:
    """Turns a validated conversation into ``input_ids`` and ``labels`` (see the module docstring)."""

    def __init__(
        self,
        tokenizer,
        template: str,
        num_visual_tokens: int,
        image_token_id: int,
        system_prompt: str | None = None,
    ):
        if template == "auto":
            template = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise DataError("data.template=chat but the tokenizer has no chat template (use plain)")
        self.tok = tokenizer
        self.template = template
        self.n_vis = num_visual_tokens
        self.image_id = image_token_id
        self.system_prompt = system_prompt

    def _ids(self, text: str) -> list[int]:
        ids: list[int] = []
        for k, piece in enumerate(text.split(IMAGE_TOKEN)):
            if k > 0:
                ids += [self.image_id] * self.n_vis
            if piece:
                ids += self.tok(piece, add_special_tokens=False)["input_ids"]
        return ids

    def segments(self, conv: list[dict]) -> list[tuple[str, bool]]:
        """``(text, is_label)`` pieces whose concatenation is the rendered conversation."""
        if self.template == "caption":
            images = IMAGE_TOKEN * sum(t["value"].count(IMAGE_TOKEN) for t in conv)
            return [(images, False), (conv[1]["value"].strip() + self.tok.eos_token, True)]
        if self.template == "plain":
            out = [(self.system_prompt + "\n\n", False)] if self.system_prompt else []
            for human, gpt in zip(conv[::2], conv[1::2]):
                out += [
                    (f"USER: {human['value']}\nASSISTANT: ", False),
                    (gpt["value"] + self.tok.eos_token, True),
                    ("\n", False),
                ]
            return out
        messages = (
            [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        )
        out, prev = [], ""
        for turn in conv:
            if turn["from"] == "human":
                messages.append({"role": "user", "content": turn["value"]})
                continue
            prompt = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            messages.append({"role": "assistant", "content": turn["value"]})
            full = self.tok.apply_chat_template(messages, tokenize=False)
            if not (prompt.startswith(prev) and full.startswith(prompt)):
                raise DataError(
                    "the tokenizer's chat template does not render conversations as growing prefixes, so answer "
                    "spans cannot be located; use data.template=plain"
                )
            out += [(prompt[len(prev) :], False), (full[len(prompt) :], True)]
            prev = full
        return out

    def _bos(self) -> list[int]:
        """The BOS the plain templates start with, when the tokenizer adds one (chat templates render it)."""
        if self.template in ("plain", "caption") and getattr(self.tok, "add_bos_token", False):
            return [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        return []

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of a one-turn prompt ending where the assistant's answer starts (for generation)."""
        if self.template == "caption":
            return self._bos() + self._ids(IMAGE_TOKEN * question.count(IMAGE_TOKEN))
        if self.template == "plain":
            system = self.system_prompt + "\n\n" if self.system_prompt else ""
            return self._bos() + self._ids(f"{system}USER: {question}\nASSISTANT: ")
        messages = (
            [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        )
        messages.append({"role": "user", "content": question})
        return self._ids(self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def __call__(self, conv: list[dict]) -> tuple[list[int], list[int]]:
        ids = self._bos()
        labels = [IGNORE_INDEX] * len(ids)
        for text, is_label in self.segments(conv):
            piece = self._ids(text)
            ids += piece
            labels += piece if is_label else [IGNORE_INDEX] * len(piece)
        return ids, labels


# ------------------------------------------------------------------------------------------ datasets
class SampleSkipped(Exception):
    """A sample that :class:`Collator` drops (too long, or unreadable with ``on_error=skip``)."""


def encode_sample(
    rec: dict, images: list[torch.Tensor], encoder: ConversationEncoder, cfg: DataConfig, where: str
) -> dict:
    sid = str(rec.get("id", where))
    ids, labels = encoder(rec["conversations"])
    if len(ids) > cfg.max_length:
        msg = f"{where}: sample {sid!r} needs {len(ids)} tokens (with {len(images)} x {encoder.n_vis} visual) > data.max_length={cfg.max_length}"
        if cfg.on_overflow == "raise":
            raise DataError(msg)
        raise SampleSkipped(msg)
    return {
        "id": sid,
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "pixel_values": torch.stack(images) if images else None,
    }


class LlavaJsonDataset(Dataset):
    """Map-style dataset over validated LLaVA records; items are dicts, or a :class:`SampleSkipped`."""

    def __init__(
        self, records: list[dict], cfg: DataConfig, encoder: ConversationEncoder, images: ImageProcessor
    ):
        self.records, self.cfg, self.encoder, self.images = records, cfg, encoder, images
        self.folder = Path(cfg.image_folder) if cfg.image_folder else Path(cfg.path).parent

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict | SampleSkipped:
        rec = self.records[i]
        where = f"{self.cfg.path} sample {rec.get('id')!r}"
        try:
            pixels = [
                self.images.load(self.folder / name, f"{where} image {self.folder / name}")
                for name in record_images(rec)
            ]
            return encode_sample(rec, pixels, self.encoder, self.cfg, str(self.cfg.path))
        except SampleSkipped as e:
            return e
        except DataError as e:
            if self.cfg.on_error == "raise":
                raise
            return SampleSkipped(str(e))


class WdsDataset(IterableDataset):
    """WebDataset shards read in order; sample ``n`` of the stream belongs to rank ``n % world_size``.

    Within a rank, whole batches go to the data-loader workers in turn (local batch ``k`` to worker
    ``k % num_workers``), which is the order the DataLoader collects them in: any number of workers
    yields exactly the sequence one process would, and every sample is seen once per epoch.
    """

    def __init__(
        self,
        cfg: DataConfig,
        encoder: ConversationEncoder,
        images: ImageProcessor,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.cfg, self.encoder, self.images, self.seed = cfg, encoder, images, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip = 0  # samples of this epoch already consumed, all ranks together (resume)
        self.batch_size = 1  # set by the trainer: the unit handed to each data-loader worker

    def __iter__(self) -> Iterator[dict | SampleSkipped]:
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        pipeline = wds.WebDataset(self.cfg.path, shardshuffle=False, nodesplitter=None, empty_check=False)
        for n, sample in enumerate(pipeline):
            if self.cfg.max_samples is not None and n >= self.cfg.max_samples:
                break
            if n < self.skip or n % self.world_size != self.rank:
                continue
            local = (n - self.skip) // self.world_size
            if (local // self.batch_size) % workers == worker:
                yield self._decode(sample)

    def _decode(self, sample: dict) -> dict | SampleSkipped:
        where = f"{sample.get('__url__', self.cfg.path)} key {sample.get('__key__')!r}"
        try:
            try:
                rec = json.loads(sample["json"])
            except (KeyError, json.JSONDecodeError) as e:
                raise DataError(f"{where}: no valid 'json' entry: {e}") from e
            keys = [k for k in IMAGE_KEYS if k in sample]
            rec.pop("image", None)
            rec["_image_keys"] = keys
            validate_record(rec, where)
            pixels = [self.images.load(sample[k], where) for k in keys]
            return encode_sample(rec, pixels, self.encoder, self.cfg, where)
        except SampleSkipped as e:
            return e
        except DataError as e:
            if self.cfg.on_error == "raise":
                raise
            return SampleSkipped(str(e))


def count_wds_samples(pattern: str) -> int:
    """Number of samples in a set of shards, from the tar headers only (no decoding)."""
    import tarfile

    import braceexpand

    n = 0
    for url in braceexpand.braceexpand(pattern):
        if not Path(url).is_file():
            raise DataError(f"shard {url} does not exist (data.path)")
        with tarfile.open(url) as tar:
            n += sum(1 for m in tar.getmembers() if m.name.endswith(".json"))
    return n


# ---------------------------------------------------------------------------------------- batching
@dataclass
class Collator:
    """Right-pads a list of samples into a batch; drops (and logs) skipped samples."""

    pad_token_id: int

    def __call__(self, items: list[dict | SampleSkipped]) -> dict:
        skipped = [str(x) for x in items if isinstance(x, SampleSkipped)]
        for msg in skipped:
            log.warning("skipped: %s", msg)
        items = [x for x in items if not isinstance(x, SampleSkipped)]
        batch: dict[str, Any] = {"skipped": len(skipped), "ids": [x["id"] for x in items]}
        if not items:
            return batch
        T = max(len(x["input_ids"]) for x in items)
        B = len(items)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        for b, x in enumerate(items):
            n = len(x["input_ids"])
            input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = x["input_ids"], x["labels"], 1
        pixels = [x["pixel_values"] for x in items if x["pixel_values"] is not None]
        batch.update(
            input_ids=input_ids,
            labels=labels,
            attention_mask=attention_mask,
            pixel_values=torch.cat(pixels) if pixels else None,
        )
        return batch


def length_grouped_order(
    order: list[int], lengths: list[int], has_image: list[bool], group: int, g: torch.Generator
) -> list[int]:
    """``order`` regrouped so each run of ``group`` samples is of one modality and sorted longest first, the
    runs in a seeded random order (the short last run of each modality at the end): LLaVA's
    ``group_by_modality_length`` with transformers' ``LengthGroupedSampler`` run size. Deterministic given
    ``order`` and ``g``'s state.
    """
    runs: list[list[int]] = []
    tails: list[int] = []
    for modality in (True, False):
        idx = [i for i in order if has_image[i] == modality]
        for k in range(0, len(idx), group):
            run = sorted(idx[k : k + group], key=lambda i: -lengths[i])
            (runs.append(run) if len(run) == group else tails.extend(run))
    perm = torch.randperm(len(runs), generator=g).tolist()
    return [i for r in perm for i in runs[r]] + sorted(tails, key=lambda i: -lengths[i])


def approx_length(rec: dict, num_visual_tokens: int) -> int:
    """A record's length for grouping, without tokenising it (LLaVA's way): words + visual tokens."""
    words = sum(len(str(turn.get("value", "")).split()) for turn in rec.get("conversations", []))
    return words + num_visual_tokens * len(record_images(rec))


class EpochSampler(torch.utils.data.Sampler[int]):
    """A seeded permutation per epoch, dealt round-robin to the ranks, that can start part-way.

    ``start`` counts the positions of the epoch's permutation already consumed by all ranks together,
    so a run resumed on a different number of processes continues at the same place.

    With ``lengths`` (``data.group_by_length``) the permutation is regrouped by :func:`length_grouped_order`
    into runs of up to 50 x ``batch_size x world_size`` samples sorted by length, so every micro-batch (and
    the micro-batches the ranks take side by side) holds samples of similar length: less padding. The order
    is a function of (seed, epoch, batch_size x world_size): resuming at ``start`` continues it exactly
    with the same global micro-batch.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        lengths: list[int] | None = None,
        has_image: list[bool] | None = None,
        batch_size: int = 1,
    ):
        self.n, self.seed, self.shuffle, self.rank, self.world_size = n, seed, shuffle, rank, world_size
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} samples")
        self.lengths, self.batch_size = lengths, batch_size
        self.has_image = has_image if has_image is not None else [True] * n
        self.epoch = 0
        self.start = 0

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
        if self.lengths is not None:
            per_step = self.batch_size * self.world_size
            # transformers' LengthGroupedSampler: runs of up to 50 micro-batches (fewer on small data sets)
            group = per_step * min(50, max(1, self.n // (4 * per_step)))
            order = length_grouped_order(order, self.lengths, self.has_image, group, g)
        rest = order[self.start :]
        pad = (-len(rest)) % self.world_size  # every rank gets the same count (DDP steps in lockstep)
        rest += (order * (pad // max(1, self.n) + 1))[:pad]
        return rest[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return math.ceil((self.n - self.start) / self.world_size)


@dataclass
class TrainData:
    """A stage's data: the dataset, its sampler (None for WebDataset) and its sample count."""

    dataset: Dataset | IterableDataset
    sampler: EpochSampler | None
    num_samples: int


def build_train_data(
    cfg: DataConfig,
    tokenizer,
    num_visual_tokens: int,
    image_token_id: int,
    images: ImageProcessor,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 1,
) -> TrainData:
    """Validate the data (preflight: nothing has been written yet) and build the dataset for training.

    ``batch_size`` (per process) sizes the runs of ``data.group_by_length``.
    """
    encoder = ConversationEncoder(
        tokenizer, cfg.template, num_visual_tokens, image_token_id, cfg.system_prompt
    )
    if cfg.format == "llava_json":
        records = load_llava_json(cfg)
        if not records:
            raise DataError(f"data file {cfg.path} holds no samples")
        lengths = [approx_length(r, num_visual_tokens) for r in records] if cfg.group_by_length else None
        sampler = EpochSampler(
            len(records),
            seed,
            shuffle=True,
            rank=rank,
            world_size=world_size,
            lengths=lengths,
            has_image=[bool(record_images(r)) for r in records] if lengths else None,
            batch_size=batch_size,
        )
        return TrainData(LlavaJsonDataset(records, cfg, encoder, images), sampler, len(sampler.indices()))
    if cfg.group_by_length:
        raise ConfigError(
            "data.group_by_length needs data.format=llava_json: WebDataset shards are read as a stream, in order"
        )
    if not cfg.path:
        raise DataError("data.path is not set (a shard pattern for data.format=wds)")
    n = count_wds_samples(cfg.path)
    if cfg.max_samples is not None:
        n = min(n, cfg.max_samples)
    return TrainData(
        WdsDataset(cfg, encoder, images, seed, rank, world_size), None, math.ceil(n / world_size)
    )
