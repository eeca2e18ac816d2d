"""Building a teacher cache: run the frozen teacher once over a stage's data and write what the cache
holds (:mod:`mllm_kd.teacher.cache_format`), with a manifest of what it was built for
(:mod:`mllm_kd.teacher.fingerprint`).

``python -m mllm_kd.cache_teacher --config FILE --stage stage3 teacher.cache=DIR`` calls
:func:`build_teacher_cache`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mllm_kd.atomic import atomic_dir
from mllm_kd.data.datasets import Collator, build_train_data
from mllm_kd.data.encoding import ImageProcessor, SampleSkipped
from mllm_kd.errors import ConfigError
from mllm_kd.losses.head import head_gram, relation_matrix
from mllm_kd.losses.reference import response_mask
from mllm_kd.runtime.device import autocast_dtype, pick_device
from mllm_kd.teacher.cache_cross import CrossCache
from mllm_kd.teacher.cache_format import (
    CACHE_VERSION,
    CROSS_FILES,
    FILES,
    INDEX,
    MANIFEST,
    PROJECTED_IMAGES,
    keeps_projected_images,
    relation_size,
    relation_values,
    sample_hash,
    teacher_topk,
)
from mllm_kd.teacher.fingerprint import expected_record, teacher_fingerprint
from mllm_kd.teacher.load import load_teacher_model
from mllm_kd.train.stage import init_model

log = logging.getLogger(__name__)


def _index_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "int32"


@torch.no_grad()
def teacher_rows(
    teacher: nn.Module,
    batch: dict,
    k: int,
    rank: int,
    gram: torch.Tensor,
    chunk_size: int = 256,
    projected_images: bool = False,
) -> list[dict]:
    """Run the teacher on one batch; per sample, what the cache stores (numpy arrays, in row order), with
    ``projected_images`` also its projected images (``"visual"``, float16 ``[images, n_vis, d]``)."""

    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    t_out = teacher(ids, attn, batch["pixel_values"], return_logits=False)
    hidden = t_out.hidden
    visual = None
    if projected_images and t_out.visual is not None:
        visual = t_out.visual.detach().float().cpu()
        if visual.abs().max() > torch.finfo(torch.float16).max or not visual.isfinite().all():
            raise ConfigError(
                "teacher.cache_projected_images: the teacher's projected images hold values float16 cannot "
                f"keep (largest |value| {visual.abs().max().item():.4g}); build the cache without them "
                "(teacher.cache_projected_images=false, loss.w_emb=0) or use the online teacher"
            )
        visual = visual.half()
    head = teacher.llm.get_output_embeddings()
    w, b = head.weight, head.bias
    vis = ids == teacher.image_token_id
    rows = response_mask(labels) | vis
    logp, idx, rest, _ = teacher_topk(hidden[rows], w, b, k, chunk_size)
    n_vis = teacher.num_visual_tokens
    rels = None
    if vis.any():
        with torch.autocast(ids.device.type, enabled=False):
            hv = hidden[vis].view(-1, n_vis, hidden.shape[-1])
            rels = relation_matrix(hv, gram, b is not None).cpu()
    counts = rows.sum(1).tolist()
    img_counts = (vis.sum(1) // n_vis).tolist()
    out, r0, m0 = [], 0, 0
    ids_cpu, labels_cpu = ids.cpu().numpy(), labels.cpu().numpy()
    lengths = attn.sum(1).tolist()
    for bi, sid in enumerate(batch["ids"]):
        n, m = int(counts[bi]), int(img_counts[bi])
        rel_vals = [relation_values(rels[m0 + j], rank) for j in range(m)] if m else []
        out.append(
            {
                "id": str(sid),
                "hash": sample_hash(ids_cpu[bi, : lengths[bi]], labels_cpu[bi, : lengths[bi]]),
                "logprobs": logp[r0 : r0 + n].numpy(),
                "indices": idx[r0 : r0 + n].numpy(),
                "rest": rest[r0 : r0 + n].numpy().astype(np.float32),
                "relation": torch.cat(rel_vals).numpy() if rel_vals else np.zeros(0, np.float16),
                "n_images": m,
                "n_resp": int(response_mask(labels[bi : bi + 1]).sum()),
            }
        )
        if projected_images:
            dims = (n_vis, hidden.shape[-1])
            out[-1]["visual"] = visual[m0 : m0 + m].numpy() if m else np.zeros((0, *dims), np.float16)
        r0, m0 = r0 + n, m0 + m
    return out


def _iter_samples(data):
    """The data set's samples in index order (a WebDataset in stream order), skipped ones as
    :class:`SampleSkipped`."""
    ds = data.dataset
    if data.sampler is not None:
        for i in range(len(ds)):
            yield ds[i]
    else:
        yield from ds


class CacheWriter:
    """Writes a cache directory's files and index, sample after sample (what :func:`teacher_rows` returns).

    A context manager: the files close on exit, and the index is written then. :meth:`describe` gives the
    manifest's ``layout`` and ``stats``; the caller adds what the cache was built for and writes it.
    ``cross``: a cache for ``loss.cross_tokenizer`` (the per-row files of :data:`CROSS_FILES` too; each
    sample also holds ``rest_shared`` and ``positions``). ``projected_images``: each sample also holds
    ``visual``, its images' projected tokens (written to :data:`PROJECTED_IMAGES`).
    """

    def __init__(
        self,
        directory: Path,
        index_dtype: str,
        num_visual_tokens: int,
        cross: bool = False,
        projected_images: bool = False,
    ):
        self.directory, self.index_dtype, self.n_vis = Path(directory), index_dtype, num_visual_tokens
        self.names = {
            **FILES,
            **({k: CROSS_FILES[k] for k in ("rest_shared", "positions")} if cross else {}),
            **({"visual": PROJECTED_IMAGES} if projected_images else {}),
        }
        self.visual_shape: list[int] | None = None  # [n_vis, d] of the projected images written
        self.index: dict[str, list] = {
            k: [] for k in ("ids", "hashes", "row_start", "n_rows", "n_images", "rel_start")
        }
        self.stats = {"samples": 0, "rows": 0, "response_rows": 0, "visual_rows": 0, "images": 0}
        self.rel_n = 0
        self.leftover = 0.0  # sum over rows of the teacher's mass outside the top k
        self.files = {name: open(self.directory / fname, "wb") for name, fname in self.names.items()}  # noqa: SIM115

    def add(self, samples: list[dict]) -> None:
        for s in samples:
            self.index["ids"].append(s["id"])
            self.index["hashes"].append(s["hash"])
            self.index["row_start"].append(self.stats["rows"])
            self.index["n_rows"].append(len(s["rest"]))
            self.index["n_images"].append(s["n_images"])
            self.index["rel_start"].append(self.rel_n)
            self.files["logprobs"].write(np.ascontiguousarray(s["logprobs"], dtype=np.float16).tobytes())
            self.files["indices"].write(np.ascontiguousarray(s["indices"], dtype=self.index_dtype).tobytes())
            self.files["rest"].write(np.ascontiguousarray(s["rest"], dtype=np.float32).tobytes())
            self.files["relation"].write(np.ascontiguousarray(s["relation"], dtype=np.float16).tobytes())
            if "visual" in self.files:
                self.files["visual"].write(np.ascontiguousarray(s["visual"], np.float16).tobytes())
                self.visual_shape = list(s["visual"].shape[1:])
            if "rest_shared" in self.files:
                self.files["rest_shared"].write(np.ascontiguousarray(s["rest_shared"], np.float32).tobytes())
                self.files["positions"].write(np.ascontiguousarray(s["positions"], np.int32).tobytes())
            self.rel_n += len(s["relation"])
            self.leftover += float(np.exp(s["rest"].astype(np.float64)).sum())
            self.stats["samples"] += 1
            self.stats["rows"] += len(s["rest"])
            self.stats["response_rows"] += s["n_resp"]
            self.stats["visual_rows"] += s["n_images"] * self.n_vis
            self.stats["images"] += s["n_images"]

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files.values():
            f.close()
        if exc[0] is None:
            (self.directory / INDEX).write_text(json.dumps(self.index))

    def describe(self, k: int, rank: int) -> dict:
        """The manifest's ``layout`` and ``stats`` of what was written (after the files are closed)."""
        sizes = {name: (self.directory / fname).stat().st_size for name, fname in self.names.items()}
        total_bytes = sum(sizes.values())
        distilled_bytes = total_bytes - sizes.get("visual", 0)  # the projected images: counted per image
        rows = max(self.stats["rows"], 1)
        return {
            "layout": {
                "k": k,
                "index_dtype": self.index_dtype,
                "logprob_dtype": "float16",
                "rest": "float32 log(1 - sum top-k p)",
                "relation": "upper triangle, float16" if rank <= 0 else f"rank-{rank} factor, float16",
                "relation_rank": rank,
                "rows": self.stats["rows"],
                "relation_values": self.rel_n,
                "row_order": "response | visual positions of each sample, row-major",
                "files": self.names,
                **(
                    {
                        "projected_images": {
                            "dtype": "float16",
                            "shape": [self.stats["images"], *self.visual_shape],
                        }
                    }
                    if "visual" in self.names and self.visual_shape
                    else {}
                ),
            },
            "stats": {
                **self.stats,
                "bytes": sizes,
                "total_bytes": total_bytes,
                # + log p_rest (+ its shared part and the student position in a cross-tokenizer cache)
                "bytes_per_row_topk": k * (2 + np.dtype(self.index_dtype).itemsize)
                + (12 if "positions" in self.names else 4),
                "bytes_per_distilled_token": distilled_bytes / rows,
                "bytes_per_image_relation": relation_size(self.n_vis, rank) * 2,
                **(
                    {"bytes_per_image_projected": int(np.prod(self.visual_shape)) * 2}
                    if "visual" in self.names and self.visual_shape
                    else {}
                ),
                "mean_leftover_mass": self.leftover / rows,
            },
        }


def build_teacher_cache(
    cfg,
    out: str | Path,
    batch_size: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Run the teacher of stage ``cfg`` once over the stage's data and write the cache to ``out``.

    The student's starting point (``init_from``, or the model built from ``model``) provides the tokenizer
    and image preprocessing, and the data set is built with :func:`mllm_kd.data.build_train_data` exactly as
    :func:`mllm_kd.train.stage.run_stage` builds it. Returns the manifest.
    """
    out = Path(out)
    k_req, rank = cfg.teacher.cache_topk, cfg.teacher.cache_relation_rank
    projected = keeps_projected_images(cfg)
    dev = pick_device(device or cfg.train.device)
    student, tokenizer, model_cfg = init_model(cfg, cfg.model)
    teacher = load_teacher_model(cfg, student, tokenizer, cross_tokenizer=cfg.loss.cross_tokenizer)
    images = ImageProcessor(
        student.vision.image_size, list(model_cfg.vision.image_mean), list(model_cfg.vision.image_std)
    )
    data = build_train_data(
        cfg.data, tokenizer, student.num_visual_tokens, student.image_token_id, images, seed=cfg.train.seed
    )
    record = expected_record(
        cfg, tokenizer, student.num_visual_tokens, student.image_token_id, student.vocab_size, images
    )
    vocab = student.vocab_size
    # loss.cross_tokenizer: both encodings, rows at the teacher's aligned and pooled positions
    cross = CrossCache(cfg, data, tokenizer, student, teacher) if cfg.loss.cross_tokenizer else None
    data = cross.data if cross else data
    del student
    if cross is None and k_req >= vocab:
        raise ConfigError(f"teacher.cache_topk={k_req} must be smaller than the vocabulary ({vocab})")
    amp = autocast_dtype(cfg.train.precision, dev)
    teacher.to(dev, dtype=amp or torch.float32).eval().requires_grad_(False)
    head = teacher.llm.get_output_embeddings()
    gram = head_gram(head.weight.detach(), None if head.bias is None else head.bias.detach())
    collate = cross.collate if cross else Collator(tokenizer.pad_token_id)
    n_vis = cross.n_pool if cross else record["num_visual_tokens"]
    index_dtype = _index_dtype(vocab + 1 if cross else vocab)  # cross: the student's vocabulary size + 1 ids
    bs = batch_size or cfg.train.batch_size
    started = time.perf_counter()
    skipped = 0
    with atomic_dir(out) as tmp:
        with CacheWriter(
            tmp, index_dtype, n_vis, cross=cross is not None, projected_images=projected
        ) as writer:
            pending: list[dict] = []
            bar = tqdm(total=data.num_samples, desc="cache_teacher", disable=not progress, dynamic_ncols=True)

            def flush() -> None:
                if not pending:
                    return
                batch = collate(pending)
                batch = {kk: v.to(dev) if isinstance(v, torch.Tensor) else v for kk, v in batch.items()}
                with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                    if cross:
                        samples = cross.rows(teacher, batch, k_req, rank, gram, cfg.loss.chunk_size)
                    else:
                        samples = teacher_rows(
                            teacher, batch, k_req, rank, gram, cfg.loss.chunk_size, projected_images=projected
                        )
                    writer.add(samples)
                bar.update(len(pending))
                pending.clear()

            for item in _iter_samples(data):
                if isinstance(item, SampleSkipped):
                    skipped += 1
                    if cross:
                        cross.skipped(item)
                    bar.update(1)
                    continue
                pending.append(item)
                if len(pending) == bs:
                    flush()
            flush()
            bar.close()
        if writer.stats["samples"] == 0:
            raise ConfigError(f"no sample of {cfg.data.path} could be cached (all skipped)")
        manifest = {
            "version": CACHE_VERSION,
            "built_for": record,
            "teacher": {
                **(teacher_fingerprint(cfg.teacher.checkpoint) if cfg.teacher.checkpoint else {}),
                "quantize": cfg.teacher.quantize,
                "precision": str(amp or torch.float32).replace("torch.", ""),
                "device": str(dev),
            },
            "stage": cfg.stage,
            "data_path": str(cfg.data.path),
            **writer.describe(k_req, rank),
        }
        if cross:
            manifest["layout"]["cross_tokenizer"] = cross.finish(tmp, writer.stats["response_rows"])
        manifest["stats"].update(skipped=skipped, seconds=round(time.perf_counter() - started, 3))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    stats = manifest["stats"]
    log.info(
        "teacher cache %s: %d samples (%d skipped), %d distilled positions, %.1f bytes per distilled token "
        "(%d of them top-k), %.1f s",
        out,
        stats["samples"],
        stats["skipped"],
        stats["rows"],
        manifest["stats"]["bytes_per_distilled_token"],
        manifest["stats"]["bytes_per_row_topk"],
        manifest["stats"]["seconds"],
    )
    return manifest


def describe(manifest: dict) -> dict:
    """A short summary of a manifest (what ``cache_teacher`` prints)."""
    s, lay = manifest["stats"], manifest["layout"]
    return {
        "samples": s["samples"],
        "skipped": s["skipped"],
        "distilled_tokens": s["rows"],
        "k": lay["k"],
        "index_dtype": lay["index_dtype"],
        "relation": lay["relation"],
        "total_bytes": s["total_bytes"],
        "bytes_per_distilled_token": round(s["bytes_per_distilled_token"], 2),
        "bytes_per_row_topk": s["bytes_per_row_topk"],
        "mean_leftover_mass": round(s["mean_leftover_mass"], 5),
        "seconds": s["seconds"],
        **(
            {"aligned_fraction": round(lay["cross_tokenizer"]["aligned_fraction"], 4)}
            if "cross_tokenizer" in lay
            else {}
        ),
    }
