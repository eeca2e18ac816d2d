"""Reading a teacher cache: :class:`CachedTeacher` (the format is :mod:`mllm_kd.teacher.cache_format`).

A stage run with ``teacher.cache=DIR`` opens the cache (:func:`open_cache`), refuses it unless it was built
for this stage's data, tokenizer and settings (:meth:`CachedTeacher.check`), and looks up each batch's
teacher outputs by sample id and a hash of its tokens (:meth:`CachedTeacher.lookup`). A cache built for
``loss.cross_tokenizer`` (:mod:`mllm_kd.teacher.cache_cross`) is read by the same class and its lookup
returns a :class:`~mllm_kd.losses.cached_cross.CrossCachedBatch`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mllm_kd.data.cross_tokens import WithoutSamples
from mllm_kd.data.datasets import TrainData
from mllm_kd.errors import CompatibilityError, ConfigError
from mllm_kd.losses.cached import CachedBatch
from mllm_kd.losses.cached_cross import CrossCachedBatch
from mllm_kd.losses.reference import KD_KINDS
from mllm_kd.teacher.cache_format import (
    CACHE_VERSION,
    CROSS_FILES,
    FILES,
    INDEX,
    MANIFEST,
    PROJECTED_IMAGES,
    keeps_projected_images,
    relation_from_values,
    relation_size,
    sample_hash,
)
from mllm_kd.teacher.fingerprint import data_fingerprint, record_differences, teacher_fingerprint

log = logging.getLogger(__name__)


class CachedTeacher:
    """A teacher cache directory, opened: no weights, no forward pass; :meth:`lookup` returns a batch's
    stored outputs (memory-mapped arrays, read on demand), which :mod:`mllm_kd.losses.cached` consumes.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise ConfigError(
                f"teacher.cache={self.directory} is not a teacher cache (no {MANIFEST}); build one with "
                "python -m mllm_kd.cache_teacher --config FILE --stage STAGE teacher.cache=DIR"
            )
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("version") != CACHE_VERSION:
            raise ConfigError(
                f"teacher cache {self.directory} has format version {self.manifest.get('version')}, this "
                f"mllm_kd reads version {CACHE_VERSION}: rebuild it"
            )
        layout = self.manifest["layout"]
        self.k = int(layout["k"])
        self.rank = int(layout["relation_rank"])
        self.cross: dict | None = layout.get("cross_tokenizer")  # a cache for loss.cross_tokenizer
        self.n_vis = int(
            self.cross["visual_rows_per_image"]
            if self.cross
            else self.manifest["built_for"]["num_visual_tokens"]
        )
        rows, rel_values = int(layout["rows"]), int(layout["relation_values"])
        self.rel_size = relation_size(self.n_vis, self.rank)

        def memmap(name: str, dtype: str, shape: tuple[int, ...]):
            if math.prod(shape) == 0:
                return np.zeros(shape, dtype=dtype)
            path = self.directory / {**FILES, **CROSS_FILES}[name]
            return np.memmap(path, dtype=dtype, mode="r", shape=shape)

        self.logprobs = memmap("logprobs", "float16", (rows, self.k))
        self.indices = memmap("indices", layout["index_dtype"], (rows, self.k))
        self.rest = memmap("rest", "float32", (rows,))
        self.relation = memmap("relation", "float16", (rel_values,))
        # the teacher's projected images [images, n_vis, d] (loss.w_emb), where the cache keeps them
        projected = layout.get("projected_images")
        self.projected_images = None
        if projected:
            shape = tuple(int(x) for x in projected["shape"])
            self.projected_images = (
                np.memmap(self.directory / PROJECTED_IMAGES, dtype="float16", mode="r", shape=shape)
                if math.prod(shape)
                else np.zeros(shape, dtype="float16")
            )
        self.in_shared = None
        if self.cross:
            self.rest_shared = memmap("rest_shared", "float32", (rows,))
            self.positions = memmap("positions", "int32", (rows,))
            shared = np.fromfile(self.directory / CROSS_FILES["shared"], dtype=np.int32)
            self.in_shared = torch.zeros(int(self.cross["student_vocab_size"]), dtype=torch.bool)
            self.in_shared[torch.from_numpy(shared.astype(np.int64))] = True
        index = json.loads((self.directory / INDEX).read_text())
        self.ids: list[str] = index["ids"]
        self.hashes: list[str] = index["hashes"]
        self.row_start = np.asarray(index["row_start"], dtype=np.int64)
        self.n_rows = np.asarray(index["n_rows"], dtype=np.int64)
        self.n_images = np.asarray(index["n_images"], dtype=np.int64)
        self.rel_start = np.asarray(index["rel_start"], dtype=np.int64)
        self.image_start = np.cumsum(self.n_images) - self.n_images  # images are stored in sample order
        self._by_id: dict[str, list[int]] = {}
        for i, sid in enumerate(self.ids):
            self._by_id.setdefault(sid, []).append(i)

    def __len__(self) -> int:
        return len(self.ids)

    def without_skipped(self, data: TrainData) -> TrainData:
        """``data`` without the samples a cross-tokenizer cache left out because the teacher's encoding
        skipped them (too long for its tokenizer, or unreadable), as the online stage drops them."""
        skip = set((self.cross or {}).get("teacher_skipped", []))
        if not skip:
            return data
        why = f"skipped for the teacher when the teacher cache {self.directory} was built"
        return replace(data, dataset=WithoutSamples(data.dataset, skip, why))

    def check(self, expected: dict, teacher_checkpoint: str | None = None) -> None:
        """Refuse (:class:`CompatibilityError`) a cache built for other data, tokenizer or settings."""
        diffs = record_differences(self.manifest["built_for"], expected)
        built_teacher = self.manifest.get("teacher", {})
        if teacher_checkpoint:
            try:
                current = teacher_fingerprint(teacher_checkpoint)
            except Exception as e:  # the teacher is not needed to train from its cache
                log.warning(
                    "teacher.checkpoint %s cannot be read (%s); trusting the cache %s, built from %s",
                    teacher_checkpoint,
                    e,
                    self.directory,
                    built_teacher.get("path"),
                )
            else:
                if current["sha256"] != built_teacher.get("sha256"):
                    diffs.append(
                        f"teacher checkpoint: cache built from {built_teacher.get('path')} "
                        f"(fingerprint {str(built_teacher.get('sha256'))[:12]}...), this stage's teacher.checkpoint "
                        f"is {current['path']} (fingerprint {current['sha256'][:12]}...)"
                    )
        if diffs:
            raise CompatibilityError(
                f"teacher cache {self.directory} was built for something else than this stage:\n  - "
                + "\n  - ".join(diffs)
                + "\nRebuild it for this stage: python -m mllm_kd.cache_teacher --config FILE --stage STAGE "
                "[the same key=value overrides] teacher.cache=NEW_DIR"
            )

    def _entry(self, sid: str, digest: str) -> int:
        entries = self._by_id.get(sid)
        if not entries:
            raise CompatibilityError(
                f"sample {sid!r} is not in the teacher cache {self.directory} ({len(self.ids)} samples): "
                "was it built for this data set (and data.max_samples)?"
                + (
                    " A cross-tokenizer cache also leaves out the samples the teacher's encoding skipped "
                    "(too long for its tokenizer with data.on_overflow=skip, or unreadable)"
                    if self.cross
                    else ""
                )
            )
        for i in entries:
            if self.hashes[i] == digest:
                return i
        raise CompatibilityError(
            f"sample {sid!r} is tokenised differently from when the teacher cache {self.directory} was "
            "built (its input ids or labels differ): rebuild the cache"
        )

    def lookup(
        self,
        sample_ids: list[str],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        rows: torch.Tensor | None,
        device: torch.device | str,
    ) -> CachedBatch | CrossCachedBatch:
        """The cached outputs for a batch (any size, any order) at its distilled ``rows`` (bool ``[B, T]``;
        None for a cross-tokenizer cache, whose rows are the aligned and pooled positions it stores)."""
        ids_cpu, labels_cpu = input_ids.cpu().numpy(), labels.cpu().numpy()
        lengths = attention_mask.sum(1).cpu().tolist()
        counts = None if rows is None else rows.sum(1).cpu().tolist()
        row_slices, rel_slices, image_slices = [], [], []
        for b, sid in enumerate(sample_ids):
            n = int(lengths[b])
            i = self._entry(str(sid), sample_hash(ids_cpu[b, :n], labels_cpu[b, :n]))
            if counts is not None and int(self.n_rows[i]) != counts[b]:
                raise CompatibilityError(
                    f"sample {sid!r}: the teacher cache {self.directory} holds {self.n_rows[i]} distilled "
                    f"positions, the batch has {counts[b]}"
                )
            row_slices.append(slice(int(self.row_start[i]), int(self.row_start[i] + self.n_rows[i])))
            if self.n_images[i]:
                start = int(self.rel_start[i])
                rel_slices.append(slice(start, start + int(self.n_images[i]) * self.rel_size))
                first = int(self.image_start[i])
                image_slices.append(slice(first, first + int(self.n_images[i])))

        def gather(array: np.ndarray, slices: list[slice]) -> np.ndarray:
            parts = [array[s] for s in slices]
            return np.concatenate(parts) if parts else array[:0]

        logprobs = torch.from_numpy(gather(self.logprobs, row_slices).astype(np.float32))
        indices = torch.from_numpy(gather(self.indices, row_slices).astype(np.int64))
        rest = torch.from_numpy(np.array(gather(self.rest, row_slices), dtype=np.float32))
        relation = None
        if rel_slices:
            values = torch.from_numpy(gather(self.relation, rel_slices).astype(np.float32)).to(device)
            relation = relation_from_values(values.view(-1, self.rel_size), self.n_vis, self.rank)
        visual = None
        if self.projected_images is not None and image_slices:
            visual = torch.from_numpy(gather(self.projected_images, image_slices).astype(np.float32)).to(
                device
            )
        cached = CachedBatch(logprobs.to(device), indices.to(device), rest.to(device), relation, visual)
        if not self.cross:
            return cached
        sizes = [s.stop - s.start for s in row_slices]
        return CrossCachedBatch(
            rows=cached,
            rest_shared=torch.from_numpy(np.array(gather(self.rest_shared, row_slices))).to(device),
            positions=torch.from_numpy(gather(self.positions, row_slices).astype(np.int64)).to(device),
            sample=torch.from_numpy(np.repeat(np.arange(len(sizes)), sizes)).to(device),
            in_shared=self.in_shared.to(device),
            visual_rows=self.n_vis,
        )


_OPEN: dict[tuple, CachedTeacher] = {}


def open_cache(directory: str | Path) -> CachedTeacher:
    """A :class:`CachedTeacher` for ``directory`` (re-used while its manifest is unchanged)."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    try:
        st = manifest.stat()
        key = (str(directory.resolve()), st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        key = None
    if key is not None and key in _OPEN:
        return _OPEN[key]
    cache = CachedTeacher(directory)
    if key is not None:
        _OPEN.clear()  # keep at most one open cache per process
        _OPEN[key] = cache
    return cache


def built_from(directory: str | Path, cfg) -> bool:
    """Whether ``directory`` holds a cache built by stage ``cfg``'s teacher over its data, with the
    projected images where ``cfg`` keeps them (what a rebuild for the same stage would change;
    :meth:`CachedTeacher.check` still checks the rest)."""
    manifest = Path(directory) / MANIFEST
    if not manifest.is_file():
        return False
    built = json.loads(manifest.read_text())
    return (
        built["built_for"]["data"] == data_fingerprint(cfg.data)
        and built["teacher"].get("sha256") == teacher_fingerprint(cfg.teacher.checkpoint)["sha256"]
        and (not keeps_projected_images(cfg) or "projected_images" in built["layout"])
    )


def check_loss_settings(cfg) -> None:
    """Settings a cached teacher cannot serve: tau != 1 (the cache holds tau = 1 log-probabilities)."""
    if cfg.loss.temperature != 1.0:
        raise ConfigError(
            f"loss.temperature={cfg.loss.temperature} with teacher.cache: the cache holds the teacher's "
            "top-k log-probabilities at tau=1, and the leftover bucket cannot be re-tempered; use "
            "loss.temperature=1 or the online teacher"
        )
    if cfg.loss.kind not in KD_KINDS:
        raise ConfigError(f"loss.kind={cfg.loss.kind!r} is not one of {KD_KINDS}")
