"""The loss against a cached (offline) teacher, chunked from hidden states, and its logits reference.

The cache (:mod:`mllm_kd.teacher.cache`) holds, per distilled row, the teacher's top-``k``
log-probabilities and indices and ``log p_rest``, the log of its leftover mass; per image, its relation
matrix. The teacher distribution is known on the ``k`` stored tokens plus one "other" bucket holding
``p_rest``; the student's distribution is coarsened the same way (``q_rest = 1 - sum_topk q``, from the
log-sum-exp of the student's other logits), and the divergence of
:func:`mllm_kd.losses.reference.divergence_from_logprobs` is taken over those ``k + 1`` categories. For
``fkl`` that is ``sum_topk p log(p / q) + p_rest log(p_rest / q_rest)``; for every kind (``rkl``, ``jsd``,
``skl``, ``srkl`` are f-divergences too) the bucketed value is a lower bound of the full-vocabulary
divergence that is exact when the teacher's mass outside the top-``k`` is zero. The log-probabilities are
stored at tau = 1 and the leftover bucket cannot be re-tempered (``sum p_j^(1/tau)`` over the other tokens
is not a function of their sum), so ``loss.temperature`` must be 1 with a cached teacher.

:func:`cached_distill_loss` is the shared chunk loop of :mod:`mllm_kd.losses.kernel` with the cached
teacher's chunk function (:func:`cached_chunks`); :func:`cached_distill_loss_reference` takes the
student's full logits and autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mllm_kd.errors import CompatibilityError
from mllm_kd.losses.head import all_finite, compute_dtype
from mllm_kd.losses.kernel import collect_terms, head_loss, plan_rows, rdist_or_zero, relation_term
from mllm_kd.losses.reference import (
    IGNORE_INDEX,
    KD_KINDS,
    DistillSettings,
    divergence_from_logprobs,
    response_mask,
)


@dataclass
class CachedBatch:
    """The cached teacher outputs of one batch, at its distilled rows (row-major over ``[B, T]``).

    ``logprobs`` ``[N, k]`` float32, ``indices`` ``[N, k]`` int64, ``rest`` ``[N]`` float32 (``log p_rest``),
    ``relation`` ``[n_images, n_vis, n_vis]`` float32 (normalised ``Z_T Z_T^T``) or None; ``visual``
    ``[n_images, n_vis, d]`` float32, the teacher's projected images, where the cache keeps them (else None).
    """

    logprobs: torch.Tensor
    indices: torch.Tensor
    rest: torch.Tensor
    relation: torch.Tensor | None
    visual: torch.Tensor | None = None


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


def cached_chunks(t_logp: torch.Tensor, t_idx: torch.Tensor, t_rest: torch.Tensor, opts: dict) -> Callable:
    """The chunk function of a cached teacher: its rows' ``[N, k]`` log-probabilities and indices, and
    ``[N]`` leftover log-masses (``opts``: ``kind``, ``beta``, ``alpha``)."""

    def chunk(rows, student_logits, targets, ce_w, kd_w, need_grad):
        args = (t_logp[rows], t_idx[rows], t_rest[rows], targets, ce_w, kd_w, opts, need_grad)
        out = _chunk_grad(student_logits(), *args)
        return out if out is not None else _chunk_grad_reference(student_logits(), *args)

    return chunk


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
    plan = plan_rows(
        labels, vis_mask, weights, settings, True, with_ce, rows=response_mask(labels) | vis_mask
    )
    z = student_logits[plan.rows].float()
    d = bucketed_divergence(
        z, cached.logprobs, cached.indices, cached.rest, settings.kind, settings.beta, settings.alpha
    )
    ce = F.cross_entropy(z, plan.targets, ignore_index=IGNORE_INDEX, reduction="none")
    total = (ce * plan.ce_w).sum() + (torch.where(plan.kd_w != 0, d * plan.kd_w, 0.0)).sum()
    rdist = None
    if settings.rel:
        zs = student_logits[vis_mask].float().view(-1, num_visual_tokens, student_logits.shape[-1])
        rdist = rdist_or_zero(zs @ zs.transpose(1, 2), cached.relation)
    return collect_terms(plan, total, ce.detach(), d.detach(), rdist, float(weights.get("rdist", 0.0)))


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
    plan = plan_rows(
        labels, vis_mask, weights, settings, True, with_ce, rows=response_mask(labels) | vis_mask
    )
    n_rows = int(plan.rows.sum())
    if cached.logprobs.shape[0] != n_rows:
        raise CompatibilityError(
            f"the cached teacher has {cached.logprobs.shape[0]} rows for a batch with {n_rows}"
        )
    opts = {"kind": settings.kind, "beta": float(settings.beta), "alpha": float(settings.alpha)}
    dev = student_hidden.device
    w_rel = float(weights.get("rdist", 0.0))
    rdist, gram_grad = None, None
    if settings.rel:
        hs = student_hidden[vis_mask].view(-1, num_visual_tokens, student_hidden.shape[-1])
        rdist, gram_grad = relation_term(hs, head_weight, head_bias, cached.relation, w_rel)
    total, ce, d = head_loss(
        student_hidden[plan.rows],
        head_weight,
        head_bias,
        plan.targets,
        plan.ce_w,
        plan.kd_w,
        cached_chunks(cached.logprobs.to(dev), cached.indices.to(dev), cached.rest.to(dev), opts),
        compute_dtype(student_hidden, head_weight),
        chunk_size,
        gram_grad,
    )
    return collect_terms(plan, total, ce, d, rdist, w_rel)
