"""The losses of LLaVA-KD, as pure functions of tensors and masks.

Notation: ``z`` are LLM output logits over the vocabulary ``V``; ``p = softmax(z / tau)``.

* :func:`kd_divergence` — MDist, a divergence between teacher and student token distributions at the
  masked positions (response positions, shifted; or visual positions, not shifted).
* :func:`relation_distill` — RDist, ``1 - cos(vec(Z_S Z_S^T), vec(Z_T Z_T^T))`` per image.
* :func:`causal_lm_loss` — the usual next-token cross-entropy.
* :func:`response_mask` / :func:`distill_terms` — how a stage turns a batch into those calls.

Everything is computed in float32 whatever the input dtype. These are the logits-level *reference*
implementations: any fused or chunked fast path must be tested equal to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
KD_KINDS = ("fkl", "rkl", "jsd", "skl", "srkl")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over the last dim, from log-probabilities; 0 * log 0 counts as 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p * p + (1 - weight_p) * q), stably."""
    if weight_p <= 0.0:
        return log_q
    if weight_p >= 1.0:
        return log_p
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def divergence_from_logprobs(
    log_p_s: torch.Tensor,
    log_p_t: torch.Tensor,
    kind: str = "fkl",
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Per-position divergence between teacher and student distributions.

    Args:
        log_p_s, log_p_t: ``[..., V]`` float32 log-probabilities of student and teacher.
        kind: ``fkl`` KL(p_T || p_S); ``rkl`` KL(p_S || p_T); ``jsd`` generalised JSD with mixture
            ``m = beta p_T + (1 - beta) p_S``: ``beta KL(p_T || m) + (1 - beta) KL(p_S || m)``, and at
            its ends the KLs it interpolates (GKD, Agarwal et al. 2024; TRL's ``generalized_jsd_loss``):
            ``beta = 0`` gives ``fkl``, ``beta = 1`` gives ``rkl`` (the formula itself is 0 there);
            ``skl`` skew KL(p_T || alpha p_T + (1 - alpha) p_S); ``srkl`` skew reverse KL
            KL(p_S || alpha p_S + (1 - alpha) p_T) (DistiLLM).
    Returns:
        ``[...]`` divergence per position.
    """
    if kind == "fkl":
        return _kl(log_p_t, log_p_s)
    if kind == "rkl":
        return _kl(log_p_s, log_p_t)
    if kind == "jsd":
        if beta <= 0.0:
            return _kl(log_p_t, log_p_s)
        if beta >= 1.0:
            return _kl(log_p_s, log_p_t)
        log_m = _log_mixture(log_p_t, log_p_s, beta)
        return beta * _kl(log_p_t, log_m) + (1.0 - beta) * _kl(log_p_s, log_m)
    if kind == "skl":
        return _kl(log_p_t, _log_mixture(log_p_t, log_p_s, alpha))
    if kind == "srkl":
        return _kl(log_p_s, _log_mixture(log_p_s, log_p_t, alpha))
    raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KD_KINDS}")


def kd_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """MDist: mean over masked positions of the divergence between teacher and student, times tau^2.

    Args:
        student_logits: ``[B, T, V]``.
        teacher_logits: ``[B, T, V]`` (no gradient needed).
        mask: bool ``[B, T]``; True where the position is distilled.
        kind: see :func:`divergence_from_logprobs`.
        temperature: tau; both distributions are ``softmax(z / tau)`` and the result is scaled by tau^2.
    Returns:
        scalar float32 tensor; 0 (still attached to the graph) when the mask is empty.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: teacher and student must share the vocabulary"
        )
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match logits {tuple(student_logits.shape)}")
    if not mask.any():
        return student_logits.sum() * 0.0
    s = student_logits[mask].float() / temperature
    t = teacher_logits[mask].float() / temperature
    per_position = divergence_from_logprobs(
        F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), kind=kind, beta=beta, alpha=alpha
    )
    return per_position.mean() * temperature**2


def relation_distill(
    student_vis_logits: torch.Tensor,
    teacher_vis_logits: torch.Tensor,
    has_image: torch.Tensor | None = None,
) -> torch.Tensor:
    """RDist: mean over samples of ``1 - cos(vec(Z_S Z_S^T), vec(Z_T Z_T^T))``.

    Args:
        student_vis_logits: ``[B, n, V]`` logits at one image's ``n`` visual positions.
        teacher_vis_logits: ``[B, n, V]``.
        has_image: optional bool ``[B]``; samples where it is False are ignored.
    Returns:
        scalar float32 tensor; 0 (still attached to the graph) when no sample has an image.
    """
    if student_vis_logits.shape[:2] != teacher_vis_logits.shape[:2]:
        raise ValueError(
            f"student visual logits {tuple(student_vis_logits.shape)} and teacher visual logits "
            f"{tuple(teacher_vis_logits.shape)} have different visual-token counts"
        )
    zs, zt = student_vis_logits, teacher_vis_logits
    if has_image is not None:
        zs, zt = zs[has_image], zt[has_image]
    if zs.shape[0] == 0:
        return student_vis_logits.sum() * 0.0
    zs, zt = zs.float(), zt.float()
    return relation_loss_from_gram(zs @ zs.transpose(1, 2), zt @ zt.transpose(1, 2))


def visual_embedding_distill(student_visual: torch.Tensor, teacher_visual: torch.Tensor) -> torch.Tensor:
    """Distillation of the projected images: ``sum ||e_S - e_T||^2 / sum ||e_T||^2`` over every visual token.

    ``e_S``, ``e_T``: ``[N_images, n, d]``, what each projector writes into its LLM's input at the visual
    positions. A relative squared error (0 when the student's projected tokens equal the teacher's, 1 when
    they are zero), so weight 1 is on the scale of the other terms whatever the embeddings' norm. It asks
    the student to project images as the teacher does, which Align-KD (Feng et al., 2024) adds to
    output distillation, there weighted by the text's attention to each visual token, here unweighted. It
    is meaningful where the two LLMs read one embedding space: a student cut from the teacher's LLM (the
    same width and token embeddings). Returns a float32 scalar; the teacher's side carries no gradient.
    """
    if student_visual.shape != teacher_visual.shape:
        raise ValueError(
            f"student projected images {tuple(student_visual.shape)} and teacher projected images "
            f"{tuple(teacher_visual.shape)} differ: visual-embedding distillation needs the same number of "
            "visual tokens and the same LLM width"
        )
    s, t = student_visual.float(), teacher_visual.detach().float()
    return (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)


def hidden_layer_pairs(
    n_student: int, n_teacher: int, keep_layers: list[int] | None = None
) -> list[tuple[int, int]]:
    """Which teacher hidden state each student hidden state is distilled towards, as ``hidden_states`` indices.

    Index ``i < n`` is the input of decoder layer ``i`` (``0``: the embeddings, not distilled), index ``n``
    the final normed output (transformers' ``output_hidden_states``). A student cut from the teacher's
    depth with ``keep_layers`` (its layer ``i`` is the teacher's layer ``keep[i]``) feeds its layer ``i`` what
    the teacher feeds layer ``keep[i]``, so student block ``i`` stands for teacher layers ``keep[i] ..
    keep[i+1]-1``; without ``keep_layers`` the map is uniform (TinyBERT's): ``i -> i * n_teacher // n_student``.
    The two final outputs always pair up.
    """
    if keep_layers is not None:
        if len(keep_layers) != n_student:
            raise ValueError(
                f"keep_layers has {len(keep_layers)} entries but the student has {n_student} decoder layers"
            )
        if list(keep_layers) != sorted(set(keep_layers)) or keep_layers[-1] >= n_teacher:
            raise ValueError(
                f"keep_layers {list(keep_layers)} must be increasing indices of the teacher's {n_teacher} layers"
            )
        inner = [(i, int(keep_layers[i])) for i in range(1, n_student)]
    else:
        if n_student > n_teacher:
            raise ValueError(f"a student of {n_student} layers is deeper than its {n_teacher}-layer teacher")
        inner = [(i, i * n_teacher // n_student) for i in range(1, n_student)]
    return [*inner, (n_student, n_teacher)]


def hidden_state_distill(
    student_states: tuple[torch.Tensor, ...] | list[torch.Tensor],
    teacher_states: tuple[torch.Tensor, ...] | list[torch.Tensor],
    pairs: list[tuple[int, int]],
    mask: torch.Tensor,
) -> torch.Tensor:
    """Intermediate-layer distillation: ``mean ||h_S - h_T||^2 / ||h_T||^2`` per token, over tokens and pairs.

    ``student_states`` / ``teacher_states``: each model's ``[B, T, d]`` hidden states by layer
    (:func:`hidden_layer_pairs` indices, ``pairs`` from it); ``mask``: bool ``[B, T]``, the positions compared
    (the real tokens). Normalised per token, so the few tokens whose states are orders of magnitude larger
    than the rest (an LLM's first position) do not decide the term alone; 0 when the states agree, 1 when
    the student's are zero. It asks the student's layers to compute what the teacher's computed at the
    matching depth, at every position (TinyBERT, Minitron's recovery), which output distillation alone does
    not. Needs one width (a student cut from the teacher's LLM). float32; no gradient to the teacher.
    """
    if not pairs:
        raise ValueError("no layer pairs to distil")
    terms = []
    for i, j in pairs:
        s, t = student_states[i], teacher_states[j]
        if s.shape != t.shape:
            raise ValueError(
                f"student hidden state {i} {tuple(s.shape)} and teacher hidden state {j} {tuple(t.shape)} "
                "differ: intermediate-layer distillation needs the same width"
            )
        s, t = s[mask].float(), t[mask].detach().float()
        err = (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
        terms.append(err.mean())
    return torch.stack(terms).mean()


def relation_loss_from_gram(gram_s: torch.Tensor, gram_t: torch.Tensor) -> torch.Tensor:
    """``mean_b (1 - cos(vec(gram_s[b]), vec(gram_t[b])))`` for ``[B, n, n]`` relation matrices."""
    cos = F.cosine_similarity(gram_s.flatten(1), gram_t.flatten(1), dim=-1, eps=1e-8)
    return (1.0 - cos).mean()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over supervised tokens.

    Args:
        logits: ``[B, T, V]``; labels: ``[B, T]`` with ``-100`` where not supervised (not shifted yet).
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    if not (shift_labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, T]``: positions whose *next* token is supervised (where next-token logits are compared).

    The last position never predicts a label, so it is always False.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def teacher_right(teacher_top: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, T]``: response positions where the teacher's most likely next token is the label.

    ``teacher_top``: ``[B, T]`` the teacher's argmax token at each position (only response positions are
    read); ``labels`` unshifted, as :func:`response_mask` takes them.
    """
    right = torch.zeros_like(labels, dtype=torch.bool)
    right[:, :-1] = teacher_top[:, :-1] == labels[:, 1:]
    return right & response_mask(labels)


@dataclass(frozen=True)
class DistillSettings:
    """What a stage asks of :func:`distill_terms` (a view of ``LossConfig``)."""

    kind: str = "fkl"
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    resp: bool = True
    vis: bool = True
    rel: bool = True


def distill_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    vis_mask: torch.Tensor,
    num_visual_tokens: int,
    settings: DistillSettings,
    resp_keep: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The three LLaVA-KD distillation terms of one batch, from full logits.

    Args:
        student_logits, teacher_logits: ``[B, T, V]`` for the same input ids.
        labels: ``[B, T]`` (unshifted, -100 outside answers).
        vis_mask: bool ``[B, T]``, True at the projected image tokens; every image occupies
            ``num_visual_tokens`` consecutive positions.
        resp_keep: bool ``[B, T]`` or None: MDist_resp only at the response positions where it is True
            (:func:`teacher_right`).
    Returns:
        ``{"mdist_resp", "mdist_vis", "rdist"}`` for the terms asked for.
    """
    kw = dict(kind=settings.kind, temperature=settings.temperature, beta=settings.beta, alpha=settings.alpha)
    terms: dict[str, torch.Tensor] = {}
    if settings.resp:
        resp = response_mask(labels)
        terms["mdist_resp"] = kd_divergence(
            student_logits, teacher_logits, resp if resp_keep is None else resp & resp_keep, **kw
        )
    if settings.vis:
        terms["mdist_vis"] = kd_divergence(student_logits, teacher_logits, vis_mask, **kw)
    if settings.rel:
        v = student_logits.shape[-1]
        # Boolean indexing is row-major, so the visual positions come out image by image.
        zs = student_logits[vis_mask].view(-1, num_visual_tokens, v)
        zt = teacher_logits[vis_mask].view(-1, num_visual_tokens, v)
        terms["rdist"] = relation_distill(zs, zt)
    return terms
