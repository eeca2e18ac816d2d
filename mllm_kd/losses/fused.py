"""Fused, chunked LLaVA-KD losses against an online teacher, from final hidden states and LM-head weights.

The logits-level references live in :mod:`mllm_kd.losses.reference`; these functions compute the same
values and gradients without ever holding a ``[positions, V]`` tensor of either model for more than one
chunk:

* :func:`fused_kd_divergence` — MDist (:func:`~mllm_kd.losses.reference.kd_divergence`) over
  already-masked positions, from ``hidden [N, d]`` and the head ``weight [V, d]`` (+ optional ``bias [V]``).
* :func:`fused_cross_entropy` / :func:`fused_causal_lm_loss` — next-token cross-entropy from hidden states.
* :func:`fused_relation_distill` — RDist (:func:`~mllm_kd.losses.reference.relation_distill`) with
  ``Z Z^T = H (W^T W) H^T``: no vocabulary-sized tensor at all (a bias is folded in as an extra column).
* :func:`fused_distill_loss` — the whole objective of a micro-batch (CE + MDist_resp + MDist_vis + RDist)
  in one pass over the positions, as :class:`~mllm_kd.train.objective.LossComputer` uses it.

How memory stays bounded: the per-position losses go through the shared chunk loop of
:mod:`mllm_kd.losses.kernel` with the online teacher's chunk function (:mod:`mllm_kd.losses.online`),
which computes a chunk's student and teacher logits, the loss values and, in the forward pass already,
the gradient wrt the chunk's student logits in closed form; the kernel pushes it through the head and
frees it. So forward + backward cost the same four ``N x V x d`` matmuls as the logits path and never
store logits. Several terms share one pass (and one ``grad_W``) when their weights are known, which is
why :func:`fused_distill_loss` returns one differentiable ``total`` and detached per-term values; there
RDist's share of the head gradient is added to the same ``grad_W`` too.

All loss math is float32. The logits matmuls run in the inputs' dtype — or the autocast dtype when
autocast is on, exactly like the reference ``lm_head`` — and are cast to float32 before any softmax.
The teacher is a constant here: no gradient flows to ``teacher_*`` tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mllm_kd.losses.head import compute_dtype, head_gram, relation_matrix
from mllm_kd.losses.kernel import HeadGrad, collect_terms, head_loss, plan_rows, relation_term
from mllm_kd.losses.online import online_chunks
from mllm_kd.losses.reference import (
    IGNORE_INDEX,
    KD_KINDS,
    DistillSettings,
    relation_loss_from_gram,
    response_mask,
)

DEFAULT_CHUNK = 1024


def _fused_head_loss(
    h_s: torch.Tensor,
    w_s: torch.Tensor,
    b_s: torch.Tensor | None,
    h_t: torch.Tensor | None,
    w_t: torch.Tensor | None,
    b_t: torch.Tensor | None,
    targets: torch.Tensor | None,
    ce_w: torch.Tensor,
    kd_w: torch.Tensor,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    chunk_size: int = DEFAULT_CHUNK,
    gram_grad: HeadGrad | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks the inputs, then :func:`~mllm_kd.losses.kernel.head_loss` with the online teacher's chunks."""
    if kind not in KD_KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KD_KINDS}")
    if not 0.0 <= beta <= 1.0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"beta and alpha must lie in [0, 1], got beta={beta}, alpha={alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if h_s.ndim != 2 or w_s.ndim != 2 or h_s.shape[1] != w_s.shape[1]:
        raise ValueError(f"student hidden {tuple(h_s.shape)} and head weight {tuple(w_s.shape)} do not match")
    opts = {"kind": kind, "temperature": float(temperature), "beta": float(beta), "alpha": float(alpha)}
    if h_t is not None:
        if w_t.shape[0] != w_s.shape[0]:
            raise ValueError(
                f"student head {tuple(w_s.shape)} and teacher head {tuple(w_t.shape)} have different "
                "vocabularies: teacher and student must share the vocabulary"
            )
        if h_t.shape[0] != h_s.shape[0] or h_t.shape[1] != w_t.shape[1]:
            raise ValueError(
                f"teacher hidden {tuple(h_t.shape)} does not match student hidden {tuple(h_s.shape)} "
                f"and teacher head {tuple(w_t.shape)}"
            )
        h_t, w_t = h_t.detach(), w_t.detach()
        b_t = None if b_t is None else b_t.detach()
        opts["teacher_dtype"] = compute_dtype(h_t, w_t)
    return head_loss(
        h_s,
        w_s,
        b_s,
        targets,
        ce_w,
        kd_w,
        online_chunks(h_t, w_t, b_t, opts),
        compute_dtype(h_s, w_s),
        chunk_size,
        gram_grad,
    )


# ----------------------------------------------------------------------------------- public: MDist/CE
def fused_kd_divergence(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head_weight: torch.Tensor,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    chunk_size: int = DEFAULT_CHUNK,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """MDist over already-selected positions, from hidden states: equals :func:`kd_divergence` of the logits.

    Args:
        student_hidden: ``[N, d]`` final hidden states at the distilled positions.
        student_head_weight: ``[V, d]``; ``student_bias``: optional ``[V]``.
        teacher_hidden: ``[N, d_t]``; ``teacher_head_weight``: ``[V, d_t]``; ``teacher_bias``: ``[V]``.
        kind, temperature, beta, alpha: see :func:`mllm_kd.losses.reference.divergence_from_logprobs`.
        chunk_size: positions per chunk; at most ``chunk_size x V`` float32 tensors exist at a time.
    Returns:
        scalar float32: mean over the ``N`` positions of the divergence, times tau^2 (0 when ``N == 0``).
        Differentiable wrt the student's hidden states, head weight and bias (one backward pass).
    """
    n = student_hidden.shape[0]
    kd_w = torch.full((n,), temperature**2 / max(n, 1), device=student_hidden.device)
    total, _, _ = _fused_head_loss(
        student_hidden,
        student_head_weight,
        student_bias,
        teacher_hidden,
        teacher_head_weight,
        teacher_bias,
        None,
        torch.zeros_like(kd_w),
        kd_w,
        kind=kind,
        temperature=temperature,
        beta=beta,
        alpha=alpha,
        chunk_size=chunk_size,
    )
    return total


def fused_cross_entropy(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ W^T + b, targets, ignore_index=-100)`` (mean), chunked.

    Args:
        hidden: ``[N, d]``; head_weight: ``[V, d]``; targets: ``[N]`` class ids, -100 to ignore.
    Returns:
        scalar float32; 0 (attached) when every target is ignored.
    """
    valid = targets != IGNORE_INDEX
    ce_w = valid.float() / valid.sum().clamp(min=1)
    total, _, _ = _fused_head_loss(
        hidden,
        head_weight,
        bias,
        None,
        None,
        None,
        targets,
        ce_w,
        torch.zeros_like(ce_w),
        chunk_size=chunk_size,
    )
    return total


def fused_causal_lm_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`mllm_kd.losses.reference.causal_lm_loss` from ``hidden [B, T, d]``: only supervised positions are used."""
    mask = response_mask(labels)
    targets = labels[:, 1:][mask[:, :-1]]
    return fused_cross_entropy(hidden[mask], head_weight, targets, chunk_size=chunk_size, bias=bias)


# ---------------------------------------------------------------------------------------- public: RDist
def fused_relation_distill(
    student_vis_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher_vis_hidden: torch.Tensor,
    teacher_head_weight: torch.Tensor | None,
    has_image: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """RDist from hidden states: equals :func:`mllm_kd.losses.reference.relation_distill` of the visual logits.

    ``Z Z^T = H (W^T W) H^T`` (with a bias, ``H`` gets a column of ones and ``W`` the bias column), so the
    only large operation is ``W^T W`` (``V x d x d``, once per call); nothing of size V is stored.

    Args:
        student_vis_hidden: ``[B, n, d]`` hidden states at one image's ``n`` visual positions.
        student_head_weight: ``[V, d]``; teacher_vis_hidden: ``[B, n, d_t]``; teacher_head_weight:
            ``[V, d_t]`` (may be None when ``teacher_gram`` is given).
        has_image: optional bool ``[B]``; samples where it is False are ignored.
        teacher_gram: optional precomputed ``head_gram(teacher_head_weight, teacher_bias)`` (the teacher is
            frozen, so callers may cache it).
    Returns:
        scalar float32 tensor; 0 (still attached to the graph) when no sample has an image.
    """
    hs, ht = _check_relation_inputs(
        student_vis_hidden, student_head_weight, teacher_vis_hidden, teacher_head_weight, has_image
    )
    if hs.shape[0] == 0:
        return student_vis_hidden.sum() * 0.0
    gram_s = head_gram(student_head_weight, student_bias)
    gram_t = _teacher_gram(teacher_head_weight, teacher_bias, teacher_gram)
    with torch.autocast(hs.device.type, enabled=False):
        return relation_loss_from_gram(
            relation_matrix(hs, gram_s, student_bias is not None),
            relation_matrix(ht.detach(), gram_t, teacher_bias is not None),
        )


def _check_relation_inputs(hs, ws, ht, wt, has_image):
    if hs.shape[:2] != ht.shape[:2]:
        raise ValueError(
            f"student visual hidden states {tuple(hs.shape)} and teacher visual hidden states "
            f"{tuple(ht.shape)} have different visual-token counts"
        )
    if wt is not None and wt.shape[0] != ws.shape[0]:
        raise ValueError(
            f"student head {tuple(ws.shape)} and teacher head {tuple(wt.shape)} have different vocabularies"
        )
    if has_image is not None:
        hs, ht = hs[has_image], ht[has_image]
    return hs, ht


def _teacher_gram(weight, bias, gram):
    if gram is not None:
        return gram.detach()
    with torch.no_grad():
        return head_gram(weight.detach(), None if bias is None else bias.detach())


# ------------------------------------------------------------------------------- public: the objective
def fused_distill_loss(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    labels: torch.Tensor,
    weights: Mapping[str, float],
    teacher_hidden: torch.Tensor | None = None,
    teacher_head_weight: torch.Tensor | None = None,
    vis_mask: torch.Tensor | None = None,
    num_visual_tokens: int = 0,
    settings: DistillSettings | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_gram: torch.Tensor | None = None,
    with_ce: bool = True,
    resp_keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A micro-batch's objective from hidden states: ``sum_k weights[k] * term_k`` over nonzero weights.

    The same terms as ``causal_lm_loss`` + :func:`mllm_kd.losses.reference.distill_terms` on the logits:
    CE and MDist_resp at the response positions (hidden at t predicts label t+1), MDist_vis at the visual
    positions (unshifted), RDist per image (visual positions in row-major order, ``num_visual_tokens`` per
    image). CE and both MDist terms share one chunked pass over the union of those positions.

    Args:
        student_hidden: ``[B, T, d]``; labels: ``[B, T]`` unshifted; vis_mask: bool ``[B, T]``.
        weights: ``{"ce", "mdist_resp", "mdist_vis", "rdist"}`` (missing keys count as 0).
        teacher_hidden: ``[B, T, d_t]`` or None (CE only); settings: which distillation terms, kind, tau.
        with_ce: False leaves CE out (no ``"ce"`` term).
        resp_keep: bool ``[B, T]`` or None: MDist_resp only where True (:func:`~mllm_kd.losses.kernel.plan_rows`).
    Returns:
        ``(total, terms)``: ``total`` is differentiable; ``terms`` holds the unweighted values, detached.
    """
    settings = settings or DistillSettings()
    distill = teacher_hidden is not None
    plan = plan_rows(labels, vis_mask, weights, settings, distill, with_ce, resp_keep=resp_keep)
    w_rel = float(weights.get("rdist", 0.0))
    rdist, gram_grad = None, None
    if distill and settings.rel and vis_mask is not None:
        gram_t = _teacher_gram(teacher_head_weight, teacher_bias, teacher_gram)
        ht = teacher_hidden[vis_mask].view(-1, num_visual_tokens, teacher_hidden.shape[-1]).detach()
        with torch.no_grad(), torch.autocast(ht.device.type, enabled=False):
            rel_t = relation_matrix(ht, gram_t, teacher_bias is not None)
        rdist, gram_grad = relation_term(
            student_hidden[vis_mask].view(-1, num_visual_tokens, student_hidden.shape[-1]),
            student_head_weight,
            student_bias,
            rel_t,
            w_rel,
        )
    rows = plan.rows
    total, ce, d = _fused_head_loss(
        student_hidden[rows],
        student_head_weight,
        student_bias,
        teacher_hidden[rows] if (plan.use_resp or plan.use_vis) else None,
        teacher_head_weight,
        teacher_bias,
        plan.targets if with_ce else None,
        plan.ce_w,
        plan.kd_w,
        kind=settings.kind,
        temperature=settings.temperature,
        beta=settings.beta,
        alpha=settings.alpha,
        chunk_size=chunk_size,
        gram_grad=gram_grad,
    )
    return collect_terms(plan, total, ce, d, rdist, w_rel)
