"""The cross-tokenizer objective (``loss.cross_tokenizer``) against a cached teacher (``teacher.cache``).

A cross-tokenizer cache (:mod:`mllm_kd.teacher.cache_cross`) holds, per aligned response position and per
pooled visual position, the teacher's top-``k`` log-probabilities (tau = 1) with each token given as the
student id of the shared token of the same text, or as ``V_S`` (the student's vocabulary size: not shared);
``log p_rest``, the teacher's mass outside the top ``k``, and ``log p_rest_S``, the part of it on shared
tokens. :func:`topk_cross_divergence` is :func:`~mllm_kd.losses.cross_tokenizer.cross_vocab_divergence`
with the truncation handled as the same-vocabulary cached loss handles it (:mod:`mllm_kd.losses.cached`),
by buckets:

* **shared tokens**: the categories are the shared tokens among the top ``k`` plus one bucket holding the
  other shared tokens (teacher: ``p_rest_S``; student: its mass on the same tokens); ``loss.kind`` between
  the two renormalised distributions over those categories, weighted by the teacher's shared mass
  ``m_T = sum(shared top-k p) + p_rest_S`` (exact);
* **ULD**: the teacher's sorted non-shared probabilities are known for its ``k_N`` largest (the non-shared
  tokens of the top ``k``, in order); the rest of the sorted vector is one bucket of mass
  ``p_rest_N = p_rest - p_rest_S``: ``sum_{i < k_N} |s_i - t_i| + |sum_{i >= k_N} s_i - p_rest_N|``, with
  ``s`` the student's sorted non-shared probabilities, of which only the top ``k`` are needed (the tail is
  the student's non-shared mass minus them): a top-k of each row, not the sort the online loss does.

Both parts are lower bounds of the full-vocabulary values (an f-divergence can only shrink when categories
are merged; ``|sum a - sum b| <= sum |a - b|``), exact when the teacher's mass outside the top ``k`` is 0,
in particular with ``k = V_T``. The student's rows are computed ``loss.chunk_size`` at a time (the shared
chunk loop, gradients by autograd on the chunk: :func:`~mllm_kd.losses.cross_tokenizer.autograd_chunks`);
the teacher's side is ``[rows, k]``: no ``[B, T, V]`` tensor of either model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mllm_kd.errors import CompatibilityError
from mllm_kd.losses.cached import CachedBatch
from mllm_kd.losses.cross_tokenizer import autograd_chunks, cross_terms, pool_visual
from mllm_kd.losses.reference import DistillSettings, divergence_from_logprobs, response_mask

# A log-probability whose exp is 0 in float32: a column that is not a category, or an empty bucket (finite,
# so that neither the values nor the gradients of the divergences meet inf - inf).
_NONE = -1.0e4


@dataclass
class CrossCachedBatch:
    """The cached outputs of one batch for ``loss.cross_tokenizer`` (rows in sample order; in each sample
    the aligned response rows, then the pooled visual rows image by image).

    ``rows``: the top-k (``indices`` are student ids, ``V_S`` for a token the student does not have),
    ``rest`` and ``relation`` (``[n_images, n, n]`` of the pooled grid); ``rest_shared`` ``[N]`` the log of
    the teacher's leftover mass on shared tokens; ``positions`` ``[N]`` the student position of a response
    row (-1: a visual row); ``sample`` ``[N]`` its batch index; ``in_shared`` bool ``[V_S]`` the shared
    student tokens; ``visual_rows``: pooled visual rows per image.
    """

    rows: CachedBatch
    rest_shared: torch.Tensor
    positions: torch.Tensor
    sample: torch.Tensor
    in_shared: torch.Tensor
    visual_rows: int


def topk_cross_divergence(
    log_q: torch.Tensor,
    t_logp: torch.Tensor,
    t_idx: torch.Tensor,
    t_rest: torch.Tensor,
    t_rest_shared: torch.Tensor,
    in_shared: torch.Tensor,
    kind: str = "fkl",
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """The cross-vocabulary divergence from the teacher's top-k (module docstring), per row.

    Args:
        log_q: ``[N, V_S]`` student log-probabilities.
        t_logp: ``[N, k]`` the teacher's top-k log-probabilities (descending); t_idx: ``[N, k]`` student ids
            of those tokens, ``V_S`` where not shared; t_rest / t_rest_shared: ``[N]`` the log of the
            teacher's leftover mass, and of its part on shared tokens (-inf: none).
        in_shared: bool ``[V_S]``, the student's shared tokens.
    Returns:
        ``[N]`` in float32 (float64 for float64 inputs), differentiable wrt ``log_q``.
    """
    dtype = torch.promote_types(log_q.dtype, torch.float32)
    log_q, t_logp = log_q.to(dtype), t_logp.to(dtype)
    t_rest, t_rest_shared = t_rest.to(dtype), t_rest_shared.to(dtype)
    n, v = log_q.shape
    sh = t_idx < v
    none = log_q.new_tensor(_NONE)
    d = log_q.new_zeros(n)
    mass_not_shared = log_q.new_ones(n)  # the student's probability mass on tokens the teacher does not have
    if bool(in_shared.any()):
        stored = torch.zeros(n, v + 1, dtype=torch.bool, device=log_q.device).scatter_(1, t_idx, True)[:, :v]
        q_stored = log_q.gather(1, t_idx.masked_fill(~sh, 0)).masked_fill(~sh, _NONE)
        q_bucket = torch.where(in_shared & ~stored, log_q, none).logsumexp(-1, keepdim=True)
        log_q_shared = torch.cat([q_stored, q_bucket], 1).logsumexp(-1, keepdim=True)
        mass_not_shared = (1 - log_q_shared.squeeze(-1).exp()).clamp(min=0)
        t_cat = torch.cat([t_logp.masked_fill(~sh, _NONE), t_rest_shared.clamp(min=_NONE)[:, None]], 1)
        log_mass_t = t_cat.logsumexp(-1, keepdim=True)
        cond_s = torch.cat([q_stored, q_bucket], 1) - log_q_shared
        matched = divergence_from_logprobs(cond_s, t_cat - log_mass_t, kind=kind, beta=beta, alpha=alpha)
        d = d + log_mass_t.squeeze(-1).exp() * matched
    # ULD needs the student's sorted non-shared probabilities only as far as the teacher's are known (k_N <=
    # k); the rest of them is one sum, its non-shared mass minus those: a top-k, not a sort of the row.
    k = t_logp.shape[1]
    k_s = min(k, int((~in_shared).sum()))
    not_shared = torch.where(in_shared, none, log_q)
    s = F.pad(not_shared.topk(k_s, dim=-1).values.exp(), (0, k - k_s))
    t = torch.where(sh, 0.0, t_logp.exp()).sort(dim=-1, descending=True).values
    if k:
        known = torch.arange(k, device=log_q.device) < (~sh).sum(1, keepdim=True)
        rest_n = (t_rest.exp() - t_rest_shared.exp()).clamp(min=0)
        tail = (mass_not_shared - torch.where(known, s, 0.0).sum(-1)).clamp(min=0)
        d = d + torch.where(known, (s - t).abs(), 0.0).sum(-1) + (tail - rest_n).abs()
    return d


def cached_cross_chunks(cached: CrossCachedBatch, order: torch.Tensor, opts: dict) -> Callable:
    """The chunk function of a cached cross-tokenizer teacher: chunk row ``i`` reads cache row ``order[i]``."""
    c = cached.rows
    t_logp, t_idx = c.logprobs[order], c.indices[order]
    t_rest, t_rest_shared = c.rest[order], cached.rest_shared[order]

    def divergence(rows, active, log_q):
        t = [x[rows][active] for x in (t_logp, t_idx, t_rest, t_rest_shared)]
        return topk_cross_divergence(log_q, *t, cached.in_shared, **opts)

    return autograd_chunks(divergence, 1.0)


def cached_cross_tokenizer_loss(
    student_hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    weights: Mapping[str, float],
    cached: CrossCachedBatch,
    settings: DistillSettings,
    vis_mask: torch.Tensor | None = None,
    num_visual_tokens: int = 0,
    chunk_size: int = 256,
    head_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`~mllm_kd.losses.cross_tokenizer.cross_tokenizer_loss` with the teacher's side read from a cache.

    Args:
        student_hidden: ``[B, T, d]``; labels: ``[B, T]`` unshifted; vis_mask: bool ``[B, T]``.
        cached: the batch's rows (:meth:`mllm_kd.teacher.cache.CachedTeacher.lookup`).
        settings: ``temperature`` must be 1 (the cache holds tau = 1 log-probabilities).
    Returns:
        ``(total, terms)`` as :func:`~mllm_kd.losses.cross_tokenizer.cross_tokenizer_loss`.
    """
    device = student_hidden.device
    resp = response_mask(labels)
    n_resp = int(resp.sum())
    row_of = torch.full(labels.shape, -1, dtype=torch.long, device=device)
    row_of[resp] = torch.arange(n_resp, device=device)
    pos, sample = cached.positions.to(device), cached.sample.to(device)
    is_resp = pos >= 0
    rb, rp = sample[is_resp], pos[is_resp]
    if bool((rp >= labels.shape[1]).any()) or not bool(resp[rb, rp.clamp(max=labels.shape[1] - 1)].all()):
        raise CompatibilityError(
            "the teacher cache's aligned positions are not response positions of this batch: was it built for "
            "this data set, tokenizer and data.max_length?"
        )
    take = torch.full((n_resp,), -1, dtype=torch.long, device=device)
    take[row_of[rb, rp]] = is_resp.nonzero()[:, 0]
    vis_rows = (~is_resp).nonzero()[:, 0]
    visual, rel_t = None, None
    if vis_mask is not None and bool(vis_mask.any()) and (settings.vis or settings.rel):
        hs = student_hidden[vis_mask].view(-1, num_visual_tokens, student_hidden.shape[-1])
        if vis_rows.numel() != hs.shape[0] * cached.visual_rows:
            raise CompatibilityError(
                f"the teacher cache holds {vis_rows.numel()} pooled visual rows for a batch of {hs.shape[0]} "
                f"images of {cached.visual_rows} pooled positions"
            )
        visual = pool_visual(hs, cached.visual_rows)
        rel_t = cached.rows.relation if settings.rel else None
    order = take.clamp(min=0)
    if visual is not None and settings.vis:
        order = torch.cat([order, vis_rows])
    opts = {"kind": settings.kind, "beta": float(settings.beta), "alpha": float(settings.alpha)}
    chunks = cached_cross_chunks(cached, order, opts)
    return cross_terms(
        student_hidden, head_weight, head_bias, labels, weights, settings,
        take >= 0, visual, rel_t, chunks, chunk_size,
    )  # fmt: skip
