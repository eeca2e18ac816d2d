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
  smaller for large ``n_vis``, approximate — the builder reports the RDist error it implies).

Layout of ``DIR``: ``manifest.json`` (what the cache was built for, sizes, dtypes), ``index.json`` (per
sample: id, hash, first row, rows, images, first relation value), and flat binary arrays read with
``numpy.memmap``: ``topk_logprobs.bin`` ``[rows, k]``, ``topk_indices.bin`` ``[rows, k]``,
``rest_logprob.bin`` ``[rows]``, ``relation.bin`` (all relation values). The directory is written under a
temporary name and renamed into place. What the manifest records is :mod:`mllm_kd.teacher.fingerprint`.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

CACHE_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.json"
FILES = {
    "logprobs": "topk_logprobs.bin",
    "indices": "topk_indices.bin",
    "rest": "rest_logprob.bin",
    "relation": "relation.bin",
}


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
