"""The teacher cache's on-disk format: file names, relation packing, sample keys.

``python -m mllm_kd.cache_teacher --config FILE --stage stage3 teacher.cache=DIR`` runs the frozen teacher
once over a stage's data (:func:`mllm_kd.teacher.build.build_teacher_cache`); a stage run with
``teacher.cache=DIR`` then reads the cache instead of loading and running the teacher
(:class:`mllm_kd.teacher.cache.CachedTeacher`), and the loss is :mod:`mllm_kd.losses.cached`.

What is stored, per sample (keyed by its id and a hash of its ``input_ids`` + ``labels``), at the
distilled positions — the union of the response positions (next-token, shifted) and the visual positions,
row-major, exactly the rows of :func:`mllm_kd.losses.fused.fused_distill_loss`:

* the teacher's top-``k`` log-probabilities (``softmax`` at tau = 1, float16) and their vocabulary indices
  (uint16 when the vocabulary fits, else int32), ``k = teacher.cache_topk``;
* ``log p_rest``, the log of the leftover mass ``1 - sum(top-k p)`` (float32, computed as the log-sum-exp of
  the other ``V - k`` log-probabilities, so it stays accurate when the leftover is tiny);
* per image, the teacher's relation matrix ``R_T = Z_T Z_T^T`` (``n_vis x n_vis``) computed exactly from
  the final hidden states and the head (``H (W^T W) H^T``, float32), divided by its Frobenius norm (RDist is
  a cosine, so the scale does not matter, and the normalised values fit float16) and stored as float16:
  its upper triangle (``teacher.cache_relation_rank=0``, the default: RDist exact up to float16 rounding),
  or a rank-``r`` factor ``F`` with ``R_T ~ F F^T`` from its top-``r`` eigenpairs (``n_vis x r`` values:
  smaller for large ``n_vis``, approximate — the builder reports the RDist error it implies);
* optionally (``teacher.cache_projected_images``, or a stage with ``loss.w_emb > 0``), per image the
  teacher's projected visual tokens ``[n_vis, d]`` (what its projector writes into its LLM's input; float16:
  ``2 n_vis d`` bytes per image, e.g. 4.6 KB for 4 x 576 but 3 MB for the paper's 729 x 2048), for the
  distillation of the projected images (``loss.w_emb``).

Layout of ``DIR``: ``manifest.json`` (what the cache was built for, sizes, dtypes), ``index.json`` (per
sample: id, hash, first row, rows, images, first relation value), and flat binary arrays read with
``numpy.memmap``: ``topk_logprobs.bin`` ``[rows, k]``, ``topk_indices.bin`` ``[rows, k]``,
``rest_logprob.bin`` ``[rows]``, ``relation.bin`` (all relation values), and with projected images
:data:`PROJECTED_IMAGES` ``[images, n_vis, d]`` (images in the relation values' order). The directory is
written under a temporary name and renamed into place. What the manifest records is :mod:`mllm_kd.teacher.fingerprint`.

A cache for ``loss.cross_tokenizer`` (:mod:`mllm_kd.teacher.cache_cross`) has the same files with other
rows: each *aligned* response position (the teacher's row at its own position) and each *pooled* visual
position; its top-k indices are student ids (the shared token of the same text) or the student's
vocabulary size (a token the student does not have); and three more files (:data:`CROSS_FILES`):
``rest_shared_logprob.bin`` ``[rows]`` (the part of ``log p_rest`` on shared tokens),
``student_positions.bin`` ``[rows]`` int32 (the student position each response row is compared at, -1 for
a visual row) and ``shared_student_ids.bin`` (the student ids of the shared tokens).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from mllm_kd.losses.head import head_logits

CACHE_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.json"
FILES = {
    "logprobs": "topk_logprobs.bin",
    "indices": "topk_indices.bin",
    "rest": "rest_logprob.bin",
    "relation": "relation.bin",
}
PROJECTED_IMAGES = "projected_images.bin"  # optional: the teacher's projected images, float16
CROSS_FILES = {  # a cache for loss.cross_tokenizer: per row, then once
    "rest_shared": "rest_shared_logprob.bin",
    "positions": "student_positions.bin",
    "shared": "shared_student_ids.bin",
}


def keeps_projected_images(cfg) -> bool:
    """Whether a cache built for stage ``cfg`` keeps the teacher's projected images: asked for
    (``teacher.cache_projected_images``) or needed by the stage (``loss.w_emb > 0``), and not a cache for
    ``loss.cross_tokenizer`` (two embedding spaces: the term does not apply, and config load refuses it)."""
    return bool(cfg.teacher.cache_projected_images or cfg.loss.w_emb > 0) and not cfg.loss.cross_tokenizer


def sample_hash(input_ids: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> str:
    """A sample's key besides its id: SHA-1 of its (unpadded) input ids and labels as int64."""
    h = hashlib.sha1()
    h.update(np.asarray(input_ids, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:20]


@torch.no_grad()
def teacher_topk(
    h_rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    chunk_size: int = 256,
    shared: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What the cache stores for the teacher's rows ``h_rows [N, d]`` and head, ``chunk_size`` rows at a time.

    Returns CPU tensors: the top-``k`` log-probabilities ``[N, k]`` (float16, descending), their indices
    ``[N, k]``, ``log p_rest`` ``[N]`` (float32, the log-sum-exp of the other log-probabilities) and, with
    ``shared`` (bool ``[V]``), the part of ``log p_rest`` on the shared tokens ``[N]`` (else None).
    """
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    with torch.autocast(h_rows.device.type, enabled=False):
        for i0 in range(0, h_rows.shape[0], chunk_size):
            z = head_logits(h_rows[i0 : i0 + chunk_size].to(weight.dtype), weight, bias)  # float32 [c, V]
            logp = F.log_softmax(z, dim=-1)
            top, idx = logp.topk(k, dim=-1)
            others = logp.scatter(1, idx, float("-inf"))
            parts[0].append(top.half().cpu())
            parts[1].append(idx.cpu())
            parts[2].append(torch.logsumexp(others, dim=-1).cpu())
            if shared is not None:
                parts[3].append(torch.logsumexp(others.masked_fill(~shared, float("-inf")), dim=-1).cpu())
    if not parts[0]:
        empty = torch.zeros(0)
        return torch.zeros(0, k, dtype=torch.float16), torch.zeros(0, k, dtype=torch.long), empty, empty
    rest_shared = torch.cat(parts[3]) if shared is not None else None
    return torch.cat(parts[0]), torch.cat(parts[1]), torch.cat(parts[2]), rest_shared


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
