"""A cached (offline) teacher: the teacher's outputs stored once, read back by the distillation stages.

``python -m mllm_kd.cache_teacher --config FILE --stage stage3 teacher.cache=DIR`` runs the frozen teacher
once over a stage's data (:func:`build_teacher_cache`); a stage run with ``teacher.cache=DIR`` then reads
the cache instead of loading and running the teacher (:class:`CachedTeacher`, used by
:class:`mllm_kd.engine.LossComputer`).

What is stored, per sample (keyed by its id and a hash of its ``input_ids`` + ``labels``), at the
distilled positions — the union of the response positions (next-token, shifted) and the visual positions,
row-major, exactly the rows of :func:`mllm_kd.fused_losses.fused_distill_loss`:

* the teacher's top-``k`` log-probabilities (``softmax`` at tau = 1, float16) and their vocabulary indices
  (uint16 when the vocabulary fits, else int32), ``k = teacher.cache_topk``;
* ``log p_rest``, the log of the leftover mass ``1 - sum(top-k p)`` (float32, computed as the log-sum-exp of
  the other ``V - k`` log-probabilities, so it stays accurate when the leftover is tiny);
* per image, the teacher's relation matrix ``R_T = Z_T Z_T^T`` (``n_vis x n_vis``) computed exactly from
  the final hidden states and the head (``H (W^T W) H^T``, float32), divided by its Frobenius norm (RDist is
  a cosine, so the scale does not matter, and the normalised values fit float16) and stored as float16:
  its upper triangle (``teacher.cache_relation_rank=0``, the default: RDist exact up to float16 rounding),
  or a rank-``r`` factor ``F`` with ``R_T ~ F F^T`` from its top-``r`` eigenpairs (``n_vis x r`` values:
  smaller for large ``n_vis``, approximate — the builder reports the RDist error it implies).

Layout of ``DIR``: ``manifest.json`` (what the cache was built for, sizes, dtypes), ``index.json`` (per
sample: id, hash, first row, rows, images, first relation value), and flat binary arrays read with
``numpy.memmap``: ``topk_logprobs.bin`` ``[rows, k]``, ``topk_indices.bin`` ``[rows, k]``,
``rest_logprob.bin`` ``[rows]``, ``relation.bin`` (all relation values). The directory is written under a
temporary name and renamed into place.

The manifest records the data (a SHA-256 of the LLaVA JSON file, or the shard names and sizes), the
tokenizer (hashes of the vocabulary and the chat template), the teacher checkpoint (a fingerprint of its
files: each small file hashed whole, large files by their size and 64 evenly spaced 64 KiB blocks),
``max_length``, the template, the system prompt, the visual-token count, the image preprocessing, ``k``,
the relation representation and the quantisation. :func:`check_cache` refuses a cache whose record differs
from the stage's, naming every difference.

The loss against a cached teacher (:func:`cached_distill_loss`, chunked from hidden states; and its
logits-level reference :func:`cached_distill_loss_reference`): the teacher distribution is known on the
``k`` stored tokens plus one "other" bucket holding ``p_rest``; the student's distribution is coarsened the
same way (``q_rest = 1 - sum_topk q``, from the log-sum-exp of the student's other logits), and the
divergence of :func:`mllm_kd.losses.divergence_from_logprobs` is taken over those ``k + 1`` categories.
For ``fkl`` that is ``sum_topk p log(p / q) + p_rest log(p_rest / q_rest)``; for every kind (``rkl``,
``jsd``, ``skl``, ``srkl`` are f-divergences too) the bucketed value is a lower bound of the full-vocabulary
divergence that is exact when the teacher's mass outside the top-``k`` is zero. The log-probabilities are
stored at tau = 1 and the leftover bucket cannot be re-tempered (``sum p_j^(1/tau)`` over the other tokens
is not a function of their sum), so ``loss.temperature`` must be 1 with a cached teacher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mllm_kd.errors import CompatibilityError, ConfigError
from mllm_kd.fused_losses import (
    _add_gram_grad,
    _compute_dtype,
    _logits,
    all_finite,
    head_gram,
    push_through_head,
)
from mllm_kd.losses import IGNORE_INDEX, KD_KINDS, DistillSettings, divergence_from_logprobs, response_mask

log = logging.getLogger(__name__)

CACHE_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.json"
FILES = {
    "logprobs": "topk_logprobs.bin",
    "indices": "topk_indices.bin",
    "rest": "rest_logprob.bin",
    "relation": "relation.bin",
}
_SMALL_FILE = 4 << 20  # files up to this size are hashed whole
_BLOCK, _BLOCKS = 64 << 10, 64  # larger files: size + 64 evenly spaced 64 KiB blocks


# ----------------------------------------------------------------------------------------- fingerprints
def _sha256_file(path: Path, sampled: bool = False) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if not sampled or size <= _SMALL_FILE:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            for i in range(_BLOCKS):
                f.seek((size - _BLOCK) * i // (_BLOCKS - 1))
                h.update(f.read(_BLOCK))
    return h.hexdigest()


def data_fingerprint(data_cfg) -> dict:
    """What identifies the training data: the JSON file's SHA-256, or the WebDataset shards' names + sizes."""
    if data_cfg.format == "llava_json":
        path = Path(data_cfg.path)
        return {"format": "llava_json", "sha256": _sha256_file(path), "max_samples": data_cfg.max_samples}
    import braceexpand

    shards = [Path(u) for u in braceexpand.braceexpand(data_cfg.path)]
    listing = [[p.name, p.stat().st_size] for p in shards]
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return {"format": "wds", "sha256": digest, "shards": len(listing), "max_samples": data_cfg.max_samples}


def tokenizer_fingerprint(tokenizer) -> dict:
    vocab = sorted(tokenizer.get_vocab().items())
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "vocab_sha256": hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest(),
        "vocab_size": len(vocab),
        "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest(),
        "eos_token": tokenizer.eos_token,
        "pad_token_id": tokenizer.pad_token_id,
    }


def teacher_fingerprint(path: str | Path) -> dict:
    """The teacher checkpoint's identity: a hash over its files (large ones sampled, see the module doc)."""
    from mllm_kd.checkpoint import resolve_checkpoint
    from mllm_kd.hf_llava import is_hf_llava_dir

    root = Path(path) if is_hf_llava_dir(path) else resolve_checkpoint(path, "teacher.checkpoint")
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0" + _sha256_file(f, sampled=True).encode())
    return {"sha256": h.hexdigest(), "path": str(root.resolve())}


def expected_record(
    cfg, tokenizer, num_visual_tokens: int, image_token_id: int, vocab_size: int, images
) -> dict:
    """What a cache must have been built for to serve stage ``cfg`` (compared field by field)."""
    from mllm_kd.data import ConversationEncoder

    template = ConversationEncoder(tokenizer, cfg.data.template, num_visual_tokens, image_token_id).template
    return {
        "data": data_fingerprint(cfg.data),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": cfg.data.max_length,
        "template": template,
        "system_prompt": cfg.data.system_prompt,
        "num_visual_tokens": num_visual_tokens,
        "image_token_id": image_token_id,
        "vocab_size": vocab_size,
        "image_processor": {"size": images.size, "mean": list(images.mean), "std": list(images.std)},
        "k": cfg.teacher.cache_topk,
        "relation_rank": cfg.teacher.cache_relation_rank,
        "teacher_quantize": cfg.teacher.quantize,
    }


_FIELD_NAMES = {
    "data.sha256": "data file (SHA-256 of data.path)",
    "data.format": "data.format",
    "data.shards": "number of data shards",
    "data.max_samples": "data.max_samples",
    "tokenizer.vocab_sha256": "tokenizer vocabulary",
    "tokenizer.vocab_size": "tokenizer vocabulary size",
    "tokenizer.chat_template_sha256": "tokenizer chat template",
    "tokenizer.eos_token": "tokenizer EOS token",
    "tokenizer.pad_token_id": "tokenizer pad token",
    "max_length": "data.max_length",
    "template": "data.template (resolved)",
    "system_prompt": "data.system_prompt",
    "num_visual_tokens": "visual tokens per image",
    "image_token_id": "<image> token id",
    "vocab_size": "LM-head vocabulary size",
    "image_processor.size": "image size",
    "image_processor.mean": "image mean",
    "image_processor.std": "image std",
    "k": "k (teacher.cache_topk)",
    "relation_rank": "teacher.cache_relation_rank",
    "teacher_quantize": "teacher.quantize",
}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def record_differences(built: dict, expected: dict) -> list[str]:
    """Human-readable differences between a cache's record and what a stage needs."""
    a, b = _flatten(built), _flatten(expected)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key == "data.max_samples" and a.get(key) is None:
            continue  # a cache of the whole data set serves any subset
        if a.get(key) != b.get(key):
            what = _FIELD_NAMES.get(key, key)
            va, vb = a.get(key), b.get(key)
            if isinstance(va, str) and len(va) == 64 and isinstance(vb, str):  # hashes: shorten
                va, vb = va[:12] + "...", vb[:12] + "..."
            diffs.append(f"{what}: cache {va!r}, this stage {vb!r}")
    return diffs


def sample_hash(input_ids: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> str:
    """A sample's key besides its id: SHA-1 of its (unpadded) input ids and labels as int64."""
    h = hashlib.sha1()
    h.update(np.asarray(input_ids, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:20]


# ------------------------------------------------------------------------------------------- relations
def relation_values(rel: torch.Tensor, rank: int) -> torch.Tensor:
    """``[n, n]`` relation matrix -> the float16 values stored for it (normalised; triangle or factor)."""
    rel = rel.double()
    norm = rel.norm()
    rel = rel / norm if norm > 0 else rel
    n = rel.shape[0]
    if rank <= 0:
        iu = torch.triu_indices(n, n)
        return rel[iu[0], iu[1]].to(torch.float16)
    r = min(rank, n)
    evals, evecs = torch.linalg.eigh((rel + rel.t()) / 2)
    evals, evecs = evals[-r:].clamp(min=0), evecs[:, -r:]
    factor = evecs * evals.sqrt()
    approx = factor @ factor.t()
    scale = approx.norm()
    if scale > 0:
        factor = factor / scale.sqrt()
    if r < rank:
        factor = torch.cat([factor, factor.new_zeros(n, rank - r)], dim=1)
    return factor.to(torch.float16).reshape(-1)


def relation_from_values(values: torch.Tensor, n: int, rank: int) -> torch.Tensor:
    """Inverse of :func:`relation_values`: ``[..., m]`` stored values -> ``[..., n, n]`` float32."""
    values = values.float()
    lead = values.shape[:-1]
    if rank <= 0:
        iu = torch.triu_indices(n, n, device=values.device)
        rel = values.new_zeros(*lead, n, n)
        rel[..., iu[0], iu[1]] = values
        upper = rel.clone()
        rel = rel + upper.transpose(-1, -2)
        idx = torch.arange(n, device=values.device)
        rel[..., idx, idx] = upper[..., idx, idx]
        return rel
    factor = values.view(*lead, n, rank)
    return factor @ factor.transpose(-1, -2)


def relation_size(n: int, rank: int) -> int:
    return n * (n + 1) // 2 if rank <= 0 else n * rank


# --------------------------------------------------------------------------------------------- reading
@dataclass
class CachedBatch:
    """The cached teacher outputs of one batch, at its distilled rows (row-major over ``[B, T]``).

    ``logprobs`` ``[N, k]`` float32, ``indices`` ``[N, k]`` int64, ``rest`` ``[N]`` float32 (``log p_rest``),
    ``relation`` ``[n_images, n_vis, n_vis]`` float32 (normalised ``Z_T Z_T^T``) or None.
    """

    logprobs: torch.Tensor
    indices: torch.Tensor
    rest: torch.Tensor
    relation: torch.Tensor | None


class CachedTeacher(nn.Module):
    """A cache directory standing where the teacher model would: no parameters, outputs looked up per batch.

    It is an ``nn.Module`` so that the training engine can move and freeze it like a teacher model (both
    no-ops); :class:`mllm_kd.engine.LossComputer` recognises it and reads :meth:`lookup` instead of running
    a forward pass.
    """

    def __init__(self, directory: str | Path):
        super().__init__()
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
        self.n_vis = int(self.manifest["built_for"]["num_visual_tokens"])
        rows, rel_values = int(layout["rows"]), int(layout["relation_values"])
        self.rel_size = relation_size(self.n_vis, self.rank)

        def memmap(name: str, dtype: str, shape: tuple[int, ...]):
            if math.prod(shape) == 0:
                return np.zeros(shape, dtype=dtype)
            return np.memmap(self.directory / FILES[name], dtype=dtype, mode="r", shape=shape)

        self.logprobs = memmap("logprobs", "float16", (rows, self.k))
        self.indices = memmap("indices", layout["index_dtype"], (rows, self.k))
        self.rest = memmap("rest", "float32", (rows,))
        self.relation = memmap("relation", "float16", (rel_values,))
        index = json.loads((self.directory / INDEX).read_text())
        self.ids: list[str] = index["ids"]
        self.hashes: list[str] = index["hashes"]
        self.row_start = np.asarray(index["row_start"], dtype=np.int64)
        self.n_rows = np.asarray(index["n_rows"], dtype=np.int64)
        self.n_images = np.asarray(index["n_images"], dtype=np.int64)
        self.rel_start = np.asarray(index["rel_start"], dtype=np.int64)
        self._by_id: dict[str, list[int]] = {}
        for i, sid in enumerate(self.ids):
            self._by_id.setdefault(sid, []).append(i)

    def forward(self, *args, **kwargs):
        raise RuntimeError("a cached teacher has no forward pass; read it with lookup()")

    def __len__(self) -> int:
        return len(self.ids)

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
        rows: torch.Tensor,
        device: torch.device | str,
    ) -> CachedBatch:
        """The cached outputs for a batch (any size, any order) at its distilled ``rows`` (bool ``[B, T]``)."""
        ids_cpu, labels_cpu = input_ids.cpu().numpy(), labels.cpu().numpy()
        lengths = attention_mask.sum(1).cpu().tolist()
        counts = rows.sum(1).cpu().tolist()
        row_slices, rel_slices = [], []
        for b, sid in enumerate(sample_ids):
            n = int(lengths[b])
            i = self._entry(str(sid), sample_hash(ids_cpu[b, :n], labels_cpu[b, :n]))
            if int(self.n_rows[i]) != counts[b]:
                raise CompatibilityError(
                    f"sample {sid!r}: the teacher cache {self.directory} holds {self.n_rows[i]} distilled "
                    f"positions, the batch has {counts[b]}"
                )
            row_slices.append(slice(int(self.row_start[i]), int(self.row_start[i] + self.n_rows[i])))
            if self.n_images[i]:
                start = int(self.rel_start[i])
                rel_slices.append(slice(start, start + int(self.n_images[i]) * self.rel_size))

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
        return CachedBatch(logprobs.to(device), indices.to(device), rest.to(device), relation)


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


# --------------------------------------------------------------------------------------------- losses
def bucketed_log_probs(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``[N, V]`` logits -> ``[N, k + 1]`` log-probabilities of the ``k`` indexed tokens and of the rest."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    top = z.gather(1, indices) - lse
    rest = torch.logsumexp(z.scatter(1, indices, float("-inf")), dim=-1, keepdim=True) - lse
    return torch.cat([top, rest], dim=1)


def bucketed_divergence(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_rest: torch.Tensor,
    kind: str = "fkl",
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Per-row divergence between a cached sparse teacher and the student (the reference, with autograd).

    Args:
        student_logits: ``[N, V]``.
        teacher_logprobs: ``[N, k]`` the teacher's top-k log-probabilities; teacher_indices: ``[N, k]``.
        teacher_rest: ``[N]`` the log of the teacher's leftover mass ``1 - sum(top-k p)``.
        kind, beta, alpha: as :func:`mllm_kd.losses.divergence_from_logprobs`, over the ``k + 1`` buckets.
    Returns:
        ``[N]`` float32.
    """
    s = bucketed_log_probs(student_logits, teacher_indices)
    t = torch.cat([teacher_logprobs.float(), teacher_rest.float().unsqueeze(1)], dim=1)
    return divergence_from_logprobs(s, t, kind=kind, beta=beta, alpha=alpha)


def _relation(h: torch.Tensor, gram: torch.Tensor, bias: bool) -> torch.Tensor:
    h = h.float()
    if bias:
        h = torch.cat([h, h.new_ones(*h.shape[:-1], 1)], dim=-1)
    return (h @ gram) @ h.transpose(1, 2)


def _cached_objective_rdist(
    hs: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, rel_t: torch.Tensor | None, weight: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RDist against the cached relation matrices, and ``weight * dRDist/d(W^T W)`` symmetrised when the
    head trains: :class:`_CachedHeadLoss` adds that share, ``[W|b] (dG + dG^T)``, to its own head gradient,
    so a step holds one ``[V, d]`` gradient (as :func:`mllm_kd.fused_losses.fused_distill_loss` does). The
    returned RDist carries gradients to the hidden states only."""
    head_trains = torch.is_grad_enabled() and (w.requires_grad or (b is not None and b.requires_grad))
    with torch.autocast(hs.device.type, enabled=False):
        with torch.no_grad():
            gram = head_gram(w, b)
        if not head_trains or weight == 0 or rel_t is None:
            return _cached_rdist(_relation(hs, gram, b is not None), rel_t), None
        gram.requires_grad_()
        rdist = _cached_rdist(_relation(hs, gram, b is not None), rel_t)
        (d_gram,) = torch.autograd.grad(rdist, gram, retain_graph=True)
    return rdist, weight * (d_gram + d_gram.t())


def _cached_rdist(rel_s: torch.Tensor, rel_t: torch.Tensor | None) -> torch.Tensor:
    from mllm_kd.losses import relation_loss_from_gram

    if rel_t is None or rel_s.shape[0] == 0:
        return rel_s.sum() * 0.0
    if rel_s.shape != rel_t.shape:
        raise CompatibilityError(
            f"the batch's visual relation matrices {tuple(rel_s.shape)} do not match the cached teacher's "
            f"{tuple(rel_t.shape)}"
        )
    with torch.autocast(rel_s.device.type, enabled=False):
        return relation_loss_from_gram(rel_s.float(), rel_t.float())


def _row_weights(labels, vis_mask, rows, weights, settings, with_ce=True):
    resp = response_mask(labels)
    is_resp, is_vis = resp[rows], vis_mask[rows]
    n_resp, n_vis = int(is_resp.sum()), int(is_vis.sum())
    ce_w = is_resp.float() * (weights.get("ce", 0.0) / max(n_resp, 1)) if with_ce else is_resp.float() * 0
    kd_w = torch.zeros_like(ce_w)
    if settings.resp:
        kd_w = kd_w + is_resp.float() * (weights.get("mdist_resp", 0.0) / max(n_resp, 1))
    if settings.vis:
        kd_w = kd_w + is_vis.float() * (weights.get("mdist_vis", 0.0) / max(n_vis, 1))
    targets_full = torch.full_like(labels, IGNORE_INDEX)
    targets_full[:, :-1] = labels[:, 1:]
    return is_resp, is_vis, ce_w, kd_w, targets_full[rows]


def _terms(total, ce, d, is_resp, is_vis, settings, rdist, w_rel, with_ce=True):
    zero = total.detach() * 0.0
    terms: dict[str, torch.Tensor] = {}
    if with_ce:
        terms["ce"] = ce[is_resp].mean().detach() if is_resp.any() else zero
    if settings.resp:
        terms["mdist_resp"] = d[is_resp].mean().detach() if is_resp.any() else zero
    if settings.vis:
        terms["mdist_vis"] = d[is_vis].mean().detach() if is_vis.any() else zero
    if rdist is not None:
        terms["rdist"] = rdist.detach()
        if w_rel != 0:
            total = total + w_rel * rdist
    return total, terms


def cached_distill_loss_reference(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    vis_mask: torch.Tensor,
    num_visual_tokens: int,
    cached: CachedBatch,
    weights: dict[str, float],
    settings: DistillSettings,
    with_ce: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective against a cached teacher from the student's full logits ``[B, T, V]`` (autograd).

    The same terms as the online stage: CE at the response positions, MDist_resp and MDist_vis as the mean
    :func:`bucketed_divergence` over the response / visual rows, RDist as ``1 - cos`` against the cached
    relation matrices. ``vis_mask`` / ``labels`` select the rows exactly as the cache was built.
    """
    rows = response_mask(labels) | vis_mask
    is_resp, is_vis, ce_w, kd_w, targets = _row_weights(labels, vis_mask, rows, weights, settings, with_ce)
    z = student_logits[rows].float()
    d = bucketed_divergence(
        z, cached.logprobs, cached.indices, cached.rest, settings.kind, settings.beta, settings.alpha
    )
    ce = F.cross_entropy(z, targets, ignore_index=IGNORE_INDEX, reduction="none")
    total = (ce * ce_w).sum() + (torch.where(kd_w != 0, d * kd_w, 0.0)).sum()
    rdist = None
    if settings.rel:
        zs = student_logits[vis_mask].float().view(-1, num_visual_tokens, student_logits.shape[-1])
        rdist = _cached_rdist(zs @ zs.transpose(1, 2), cached.relation)
    return _terms(
        total, ce.detach(), d.detach(), is_resp, is_vis, settings, rdist, weights.get("rdist", 0.0), with_ce
    )


def _chunk_grad(z, t_logp, t_idx, t_rest, targets, ce_w, kd_w, opts, need_grad):
    """CE and bucketed divergence per row of one chunk, and the gradient wrt the chunk's logits ``z``.

    ``z`` ``[c, V]`` float32 is consumed: it becomes ``e = exp(z - max)``, the only exponential taken over
    the vocabulary. With ``Z = sum(e)`` and ``R`` the sum of ``e`` outside the stored tokens (summed
    directly, so a small leftover mass keeps its precision), the bucket log-probabilities are
    ``z_j - lse`` for the stored tokens and ``log(R / Z)`` for the rest. With
    ``g = d(sum kd_w D)/d(bucket log-probs)`` (``[c, k + 1]``, autograd on the small bucket tensor) and
    ``S = sum(g)``, the gradient wrt ``z_j`` is ``g_j - q_j S`` for a stored token ``j`` and
    ``g_rest q_j / q_rest - q_j S`` for the others, i.e. ``e_j (g_rest / R - S / Z)``; CE adds
    ``ce_w (q - onehot)``. Returns None when a value is not finite (also when the leftover mass
    underflows), and the caller falls back to :func:`_chunk_grad_reference`.
    """
    valid = targets != IGNORE_INDEX
    safe = targets.masked_fill(~valid, 0).unsqueeze(1)
    m = z.amax(dim=1, keepdim=True)
    z_top = z.gather(1, t_idx)
    z_tgt = z.gather(1, safe).squeeze(1)
    e = z.sub_(m).exp_()
    total = e.sum(1)
    e_top = e.gather(1, t_idx)
    e.scatter_(1, t_idx, 0.0)
    rest = e.sum(1)
    lse = m.squeeze(1) + total.log()
    ce = torch.where(valid, lse - z_tgt, 0.0)
    s = torch.cat([z_top - lse[:, None], (rest.log() - total.log())[:, None]], dim=1).requires_grad_(
        need_grad
    )
    t = torch.cat([t_logp, t_rest[:, None]], dim=1)
    with torch.enable_grad():
        d = divergence_from_logprobs(s, t, kind=opts["kind"], beta=opts["beta"], alpha=opts["alpha"])
        g = torch.autograd.grad((d * kd_w).sum(), s)[0] if need_grad else None
    d = d.detach()
    if not need_grad:
        return (ce, d, None) if all_finite(d, ce) else None
    scale = (ce_w - g.sum(1)) / total  # (ce_w - S) / Z: the q-proportional part, per row
    factor = g[:, -1] / rest + scale
    # One check of the small tensors stands for the [c, V] gradient: e is in [0, 1] when z is finite (a
    # non-finite z makes lse, hence ce, non-finite), so the gradient is finite when these are.
    if not all_finite(d, ce, g, scale, factor):
        return None
    grad = e.mul_(factor[:, None])  # the other tokens; the stored ones are 0 here
    grad.scatter_(1, t_idx, g[:, :-1] + e_top * scale[:, None])
    grad.scatter_add_(1, safe, (-ce_w * valid).unsqueeze(1))
    return ce, d, grad


def _chunk_grad_reference(z, t_logp, t_idx, t_rest, targets, ce_w, kd_w, opts, need_grad):
    z = z.detach().requires_grad_(need_grad)
    with torch.enable_grad():
        d = bucketed_divergence(z, t_logp, t_idx, t_rest, opts["kind"], opts["beta"], opts["alpha"])
        ce = F.cross_entropy(z, targets, ignore_index=IGNORE_INDEX, reduction="none")
        grad = None
        if need_grad:
            obj = torch.where(ce_w != 0, ce * ce_w, 0.0).sum() + torch.where(kd_w != 0, d * kd_w, 0.0).sum()
            (grad,) = torch.autograd.grad(obj, z)
    return ce.detach(), d.detach(), grad


class _CachedHeadLoss(torch.autograd.Function):
    """``sum_i ce_w[i] CE_i + kd_w[i] D_i`` from hidden states + head against cached teacher rows, chunked.

    Like :class:`mllm_kd.fused_losses._FusedHeadLoss`: the gradients wrt the hidden states, head weight
    and bias are computed chunk by chunk in the forward pass; backward scales them.
    """

    @staticmethod
    def forward(ctx, h, w, b, t_logp, t_idx, t_rest, targets, ce_w, kd_w, gram_grad, opts):
        need_h, need_w, need_b = (f and opts["grad_enabled"] for f in ctx.needs_input_grad[:3])
        need_grad = need_h or need_w or need_b
        n, v = h.shape[0], w.shape[0]
        chunk = max(1, int(opts["chunk_size"]))
        cdtype = opts["compute_dtype"]
        with torch.autocast(h.device.type, enabled=False):
            ws = w.to(cdtype)
            bs = None if b is None else b.to(cdtype)
            ce_all = h.new_zeros(n, dtype=torch.float32)
            d_all = h.new_zeros(n, dtype=torch.float32)
            grad_h = h.new_zeros(n, h.shape[1], dtype=torch.float32) if need_h else None
            has_work = n > 0 or gram_grad is not None
            grad_w = h.new_zeros(v, h.shape[1], dtype=torch.float32) if need_w and has_work else None
            grad_b = h.new_zeros(v, dtype=torch.float32) if need_b and has_work else None
            for i0 in range(0, n, chunk):
                i1 = min(n, i0 + chunk)
                hs = h[i0:i1].to(cdtype)
                args = (t_logp[i0:i1], t_idx[i0:i1], t_rest[i0:i1], targets[i0:i1], ce_w[i0:i1], kd_w[i0:i1])
                out = _chunk_grad(_logits(hs, ws, bs), *args, opts, need_grad)
                if out is None:
                    out = _chunk_grad_reference(_logits(hs, ws, bs), *args, opts, need_grad)
                ce, d, grad = out
                ce_all[i0:i1], d_all[i0:i1] = ce, d
                if grad is not None:
                    push_through_head(grad, hs, ws, slice(i0, i1), grad_h, grad_w, grad_b)
                    del grad
            if gram_grad is not None:  # RDist's share: d/d[W|b] = [W|b] @ gram_grad, into the same buffers
                _add_gram_grad(w, b, gram_grad, grad_w, grad_b)
            total = (ce_all * ce_w).sum() + torch.where(kd_w != 0, d_all * kd_w, 0.0).sum()
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, w.dtype, None if b is None else b.dtype)
        ctx.mark_non_differentiable(ce_all, d_all)
        return total, ce_all, d_all

    @staticmethod
    def backward(ctx, g_total, _g_ce, _g_d):
        if ctx.grads is None:
            raise RuntimeError("the cached-teacher head loss was already backpropagated once")
        grads, ctx.grads = ctx.grads, None
        scale = not bool((g_total == 1).all())
        out = [
            None if g is None else (g.mul_(g_total) if scale else g).to(dt)
            for g, dt in zip(grads, ctx.dtypes)
        ]
        return (*out, None, None, None, None, None, None, None, None)


def cached_distill_loss(
    student_hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    vis_mask: torch.Tensor,
    num_visual_tokens: int,
    cached: CachedBatch,
    weights: dict[str, float],
    settings: DistillSettings,
    chunk_size: int = 1024,
    head_bias: torch.Tensor | None = None,
    with_ce: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`cached_distill_loss_reference` from the final hidden states ``[B, T, d]`` and the LM head.

    The student's logits exist for ``chunk_size`` distilled rows at a time (about 3 float32
    ``chunk x V`` buffers); RDist uses ``Z Z^T = H (W^T W) H^T``. ``total`` is differentiable, the terms
    are detached values.
    """
    if settings.kind not in KD_KINDS:
        raise ValueError(f"unknown divergence kind {settings.kind!r}; expected one of {KD_KINDS}")
    rows = response_mask(labels) | vis_mask
    is_resp, is_vis, ce_w, kd_w, targets = _row_weights(labels, vis_mask, rows, weights, settings, with_ce)
    if cached.logprobs.shape[0] != int(rows.sum()):
        raise CompatibilityError(
            f"the cached teacher has {cached.logprobs.shape[0]} rows for a batch with {int(rows.sum())}"
        )
    opts = {
        "kind": settings.kind,
        "beta": float(settings.beta),
        "alpha": float(settings.alpha),
        "chunk_size": chunk_size,
        "compute_dtype": _compute_dtype(student_hidden, head_weight),
        "grad_enabled": torch.is_grad_enabled(),
    }
    dev = student_hidden.device
    rdist, gram_grad = None, None
    if settings.rel:
        hs = student_hidden[vis_mask].view(-1, num_visual_tokens, student_hidden.shape[-1])
        rdist, gram_grad = _cached_objective_rdist(
            hs, head_weight, head_bias, cached.relation, weights.get("rdist", 0.0)
        )
    total, ce, d = _CachedHeadLoss.apply(
        student_hidden[rows],
        head_weight,
        head_bias,
        cached.logprobs.to(dev),
        cached.indices.to(dev),
        cached.rest.to(dev),
        targets,
        ce_w.to(dev),
        kd_w.to(dev),
        gram_grad,
        opts,
    )
    return _terms(total, ce, d, is_resp, is_vis, settings, rdist, weights.get("rdist", 0.0), with_ce)


# -------------------------------------------------------------------------------------------- building
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
) -> list[dict]:
    """Run the teacher on one batch; per sample, what the cache stores (numpy arrays, in row order)."""

    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    hidden = teacher(ids, attn, batch["pixel_values"], return_logits=False).hidden
    head = teacher.llm.get_output_embeddings()
    w, b = head.weight, head.bias
    vis = ids == teacher.image_token_id
    rows = response_mask(labels) | vis
    h_rows = hidden[rows]
    logp_parts, idx_parts, rest_parts = [], [], []
    with torch.autocast(ids.device.type, enabled=False):
        for i0 in range(0, h_rows.shape[0], chunk_size):
            hs = h_rows[i0 : i0 + chunk_size]
            z = _logits(hs.to(w.dtype), w, b)  # float32 [c, V]
            logp = F.log_softmax(z, dim=-1)
            top, idx = logp.topk(k, dim=-1)
            rest = torch.logsumexp(logp.scatter(1, idx, float("-inf")), dim=-1)
            logp_parts.append(top.half().cpu())
            idx_parts.append(idx.cpu())
            rest_parts.append(rest.cpu())
        n_vis = teacher.num_visual_tokens
        rels = None
        if vis.any():
            hv = hidden[vis].view(-1, n_vis, hidden.shape[-1])
            rels = _relation(hv, gram, b is not None).cpu()
    logp = torch.cat(logp_parts) if logp_parts else torch.zeros(0, k, dtype=torch.float16)
    idx = torch.cat(idx_parts) if idx_parts else torch.zeros(0, k, dtype=torch.long)
    rest = torch.cat(rest_parts) if rest_parts else torch.zeros(0)
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
        r0, m0 = r0 + n, m0 + m
    return out


def _iter_samples(data):
    """The data set's samples in index order (a WebDataset in stream order), skipped ones as None."""
    from mllm_kd.data import SampleSkipped

    ds = data.dataset
    if data.sampler is not None:
        for i in range(len(ds)):
            item = ds[i]
            yield None if isinstance(item, SampleSkipped) else item
    else:
        for item in ds:
            yield None if isinstance(item, SampleSkipped) else item


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
    :func:`mllm_kd.recipe.run_stage` builds it. Returns the manifest.
    """
    from tqdm.auto import tqdm

    from mllm_kd.checkpoint import atomic_dir
    from mllm_kd.data import Collator, ImageProcessor, build_train_data
    from mllm_kd.engine import autocast_dtype, pick_device
    from mllm_kd.recipe import init_model, load_teacher_model

    out = Path(out)
    k_req, rank = cfg.teacher.cache_topk, cfg.teacher.cache_relation_rank
    dev = torch.device(device) if device else pick_device(cfg.train)
    student, tokenizer, model_cfg = init_model(cfg, cfg.model)
    teacher = load_teacher_model(cfg, student, tokenizer)
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
    del student
    if k_req >= vocab:
        raise ConfigError(f"teacher.cache_topk={k_req} must be smaller than the vocabulary ({vocab})")
    amp = autocast_dtype(cfg.train, dev)
    teacher.to(dev, dtype=amp or torch.float32).eval().requires_grad_(False)
    head = teacher.llm.get_output_embeddings()
    gram = head_gram(head.weight.detach(), None if head.bias is None else head.bias.detach())
    index_dtype = _index_dtype(vocab)
    collate = Collator(tokenizer.pad_token_id)
    bs = batch_size or cfg.train.batch_size
    index: dict[str, list] = {
        k: [] for k in ("ids", "hashes", "row_start", "n_rows", "n_images", "rel_start")
    }
    stats = {"samples": 0, "skipped": 0, "rows": 0, "response_rows": 0, "visual_rows": 0, "images": 0}
    leftover = 0.0  # sum over rows of the teacher's mass outside the top k
    started = time.perf_counter()
    rel_n = 0
    with atomic_dir(out) as tmp:
        files = {name: open(tmp / fname, "wb") for name, fname in FILES.items()}  # noqa: SIM115
        try:
            pending: list[dict] = []
            bar = tqdm(total=data.num_samples, desc="cache_teacher", disable=not progress, dynamic_ncols=True)

            def flush() -> None:
                nonlocal rel_n, leftover
                if not pending:
                    return
                batch = collate(pending)
                batch = {kk: v.to(dev) if isinstance(v, torch.Tensor) else v for kk, v in batch.items()}
                with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                    samples = teacher_rows(teacher, batch, k_req, rank, gram, cfg.loss.chunk_size)
                for s in samples:
                    index["ids"].append(s["id"])
                    index["hashes"].append(s["hash"])
                    index["row_start"].append(stats["rows"])
                    index["n_rows"].append(len(s["rest"]))
                    index["n_images"].append(s["n_images"])
                    index["rel_start"].append(rel_n)
                    files["logprobs"].write(np.ascontiguousarray(s["logprobs"], dtype=np.float16).tobytes())
                    files["indices"].write(np.ascontiguousarray(s["indices"], dtype=index_dtype).tobytes())
                    files["rest"].write(np.ascontiguousarray(s["rest"], dtype=np.float32).tobytes())
                    files["relation"].write(np.ascontiguousarray(s["relation"], dtype=np.float16).tobytes())
                    rel_n += len(s["relation"])
                    leftover += float(np.exp(s["rest"].astype(np.float64)).sum())
                    stats["samples"] += 1
                    stats["rows"] += len(s["rest"])
                    stats["response_rows"] += s["n_resp"]
                    stats["visual_rows"] += s["n_images"] * record["num_visual_tokens"]
                    stats["images"] += s["n_images"]
                bar.update(len(pending))
                pending.clear()

            for item in _iter_samples(data):
                if item is None:
                    stats["skipped"] += 1
                    bar.update(1)
                    continue
                pending.append(item)
                if len(pending) == bs:
                    flush()
            flush()
            bar.close()
        finally:
            for f in files.values():
                f.close()
        if stats["samples"] == 0:
            raise ConfigError(f"no sample of {cfg.data.path} could be cached (all skipped)")
        sizes = {name: (tmp / fname).stat().st_size for name, fname in FILES.items()}
        total_bytes = sum(sizes.values())
        row_bytes = k_req * (2 + np.dtype(index_dtype).itemsize) + 4
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
            "layout": {
                "k": k_req,
                "index_dtype": index_dtype,
                "logprob_dtype": "float16",
                "rest": "float32 log(1 - sum top-k p)",
                "relation": "upper triangle, float16" if rank <= 0 else f"rank-{rank} factor, float16",
                "relation_rank": rank,
                "rows": stats["rows"],
                "relation_values": rel_n,
                "row_order": "response | visual positions of each sample, row-major",
                "files": FILES,
            },
            "stats": {
                **stats,
                "bytes": sizes,
                "total_bytes": total_bytes,
                "bytes_per_row_topk": row_bytes,
                "bytes_per_distilled_token": total_bytes / max(stats["rows"], 1),
                "bytes_per_image_relation": relation_size(record["num_visual_tokens"], rank) * 2,
                "mean_leftover_mass": leftover / max(stats["rows"], 1),
                "seconds": round(time.perf_counter() - started, 3),
            },
        }
        (tmp / INDEX).write_text(json.dumps(index))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    log.info(
        "teacher cache %s: %d samples (%d skipped), %d distilled positions, %.1f bytes per distilled token "
        "(%d of them top-k), %.1f s",
        out,
        stats["samples"],
        stats["skipped"],
        stats["rows"],
        manifest["stats"]["bytes_per_distilled_token"],
        row_bytes,
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
    }
