"""Training data sets (LLaVA JSON, WebDataset shards), batching and the seeded epoch order.

The records are :mod:`mllm_kd.data.records`, their encoding :mod:`mllm_kd.data.encoding`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from mllm_kd.config import DataConfig
from mllm_kd.data.encoding import ConversationEncoder, ImageProcessor, SampleSkipped, encode_sample
from mllm_kd.data.records import IMAGE_KEYS, load_llava_json, record_images, validate_record
from mllm_kd.errors import DataError
from mllm_kd.losses import IGNORE_INDEX

log = logging.getLogger(__name__)


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
            except (KeyError, ValueError) as e:  # ValueError: JSON or UTF-8 decoding
                raise DataError(f"{where}: no valid 'json' entry: {e}") from e
            if not isinstance(rec, dict):
                raise DataError(f"{where}: the 'json' entry must be a JSON object, got {type(rec).__name__}")
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
        try:
            with tarfile.open(url) as tar:
                n += sum(1 for m in tar.getmembers() if m.name.endswith(".json"))
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"shard {url} is not a readable tar file (data.path): {e}") from e
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


def approx_length(rec: dict, num_visual_tokens: int) -> int:
    """A record's length for grouping, without tokenising it (LLaVA's way): words + visual tokens."""
    words = sum(len(str(turn.get("value", "")).split()) for turn in rec.get("conversations", []))
    return words + num_visual_tokens * len(record_images(rec))


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
    collate: Callable | None = None  # the batches' collate function (None: Collator with the pad id)
    # loss.cross_tokenizer: (student ids, teacher ids) of the tokens both vocabularies share
    shared_vocab: tuple[torch.Tensor, torch.Tensor] | None = None


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
    records: list[dict] | None = None,
) -> TrainData:
    """Validate the data (preflight: nothing has been written yet) and build the dataset for training.

    ``batch_size`` (per process) sizes the runs of ``data.group_by_length``; ``records``: the LLaVA JSON
    records when already validated (:func:`~mllm_kd.data.records.load_llava_json`), else they are read here.
    """
    encoder = ConversationEncoder(
        tokenizer, cfg.template, num_visual_tokens, image_token_id, cfg.system_prompt
    )
    if cfg.format == "llava_json":
        records = load_llava_json(cfg) if records is None else records
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
    if not cfg.path:
        raise DataError("data.path is not set (a shard pattern for data.format=wds)")
    n = count_wds_samples(cfg.path)
    if cfg.max_samples is not None:
        n = min(n, cfg.max_samples)
    return TrainData(
        WdsDataset(cfg, encoder, images, seed, rank, world_size), None, math.ceil(n / world_size)
    )
