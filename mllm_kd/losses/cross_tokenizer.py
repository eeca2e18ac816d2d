"""Distillation across vocabularies (``loss.cross_tokenizer``): MDist between a student and a teacher
whose tokenizers differ, RDist between visual grids of different sizes, all chunked like the fused losses.

The divergence (:func:`cross_vocab_divergence`), per aligned position, with ``S`` the tokens both
vocabularies share (same text, :func:`mllm_kd.data.cross_tokens.shared_vocabulary`)::

    D = m_T * D_kind(p_S( . | S) || p_T( . | S))  +  sum_i | sort(p_S[not S])_i - sort(p_T[not S])_i |

* the first term is ``loss.kind`` (fkl, rkl, jsd, ...) between the two distributions restricted to the
  shared tokens and renormalised there, weighted by the teacher's probability mass on them ``m_T``;
* the second is Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation:
  the Universal Logit Distillation Loss for LLMs"): each model's probabilities of its *other* tokens sorted
  in decreasing order, the shorter vector padded with zeros, and the L1 (1-Wasserstein) distance.

This is the hybrid of TRL's GOLD trainer (``uld_use_hybrid_loss``: a divergence on the matched tokens, ULD
on the unmatched ones) with two changes: the matched part is weighted by the teacher's mass on the matched
tokens, not by the fraction of the vocabulary they make up, and it is ``loss.kind`` between renormalised
distributions, so that with identical vocabularies ``D`` is exactly the ordinary MDist (``m_T = 1``, no
unmatched tokens) and with no shared token it is plain ULD.

Memory: the ULD sort needs each position's whole vocabulary row, so positions go through the shared
chunk loop of :mod:`mllm_kd.losses.kernel` (:func:`cross_vocab_chunks`): about 10 float32
``[chunk, max(V_S, V_T)]`` buffers at a time (the closed-form online path needs 3-4); no ``[B, T, V]``
tensor of either model. The gradient of each chunk comes from autograd on that chunk alone.

Visual positions: the two models may produce different numbers of visual tokens per image.
:func:`pool_visual` average-pools the larger grid of hidden states down to the smaller one (2-D adaptive
average pooling when both counts are squares, 1-D otherwise), then MDist_vis compares the pooled rows
with the same divergence and RDist the relation matrices of the pooled rows. Pooling hidden states equals
pooling the logits (the head is linear).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from mllm_kd.errors import CompatibilityError
from mllm_kd.losses.head import compute_dtype, head_gram, head_logits, relation_matrix
from mllm_kd.losses.kernel import head_loss, relation_term
from mllm_kd.losses.reference import (
    IGNORE_INDEX,
    DistillSettings,
    divergence_from_logprobs,
    response_mask,
)


def cross_vocab_divergence(
    log_p_s: torch.Tensor,
    log_p_t: torch.Tensor,
    shared_s: torch.Tensor,
    shared_t: torch.Tensor,
    kind: str = "fkl",
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """The cross-vocabulary divergence per position (module docstring).

    Args:
        log_p_s: ``[N, V_S]`` student log-probabilities; log_p_t: ``[N, V_T]`` teacher log-probabilities.
        shared_s, shared_t: ``[S]`` ids of the shared tokens in each vocabulary (pairs, same order).
        kind, beta, alpha: the matched part's divergence, see
            :func:`~mllm_kd.losses.reference.divergence_from_logprobs`.
    Returns:
        ``[N]``; differentiable wrt ``log_p_s``.
    """
    d = log_p_s.new_zeros(log_p_s.shape[0])
    n_shared = shared_s.numel()
    if n_shared:
        ms, mt = log_p_s[:, shared_s], log_p_t[:, shared_t]
        log_mass_t = torch.logsumexp(mt, dim=-1, keepdim=True)
        cond_s = ms - torch.logsumexp(ms, dim=-1, keepdim=True)
        cond_t = mt - log_mass_t
        matched = divergence_from_logprobs(cond_s, cond_t, kind=kind, beta=beta, alpha=alpha)
        d = d + log_mass_t.squeeze(-1).exp() * matched
    rest_s = _unshared(log_p_s, shared_s)
    rest_t = _unshared(log_p_t, shared_t)
    width = max(rest_s.shape[-1], rest_t.shape[-1])
    if width:
        ss = F.pad(rest_s.exp().sort(dim=-1, descending=True).values, (0, width - rest_s.shape[-1]))
        st = F.pad(rest_t.exp().sort(dim=-1, descending=True).values, (0, width - rest_t.shape[-1]))
        d = d + (ss - st).abs().sum(-1)
    return d


def _unshared(log_p: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """The columns of ``log_p`` not in ``shared``."""
    if shared.numel() == 0:
        return log_p
    keep = torch.ones(log_p.shape[-1], dtype=torch.bool, device=log_p.device)
    keep[shared] = False
    return log_p[:, keep]


def autograd_chunks(divergence: Callable, temperature: float) -> Callable:
    """A chunk function (:data:`mllm_kd.losses.kernel.ChunkFn`) whose gradient comes from autograd on the
    chunk: CE on the student's targets, and ``divergence(rows, active, log_p_s)`` ``[n_active]`` at the rows
    whose ``kd_w`` is not 0 (``log_p_s``: the student's ``log_softmax(z / temperature)`` there)."""
    tau = float(temperature)

    def chunk(rows, student_logits, targets, ce_w, kd_w, need_grad):
        zs = student_logits().detach().requires_grad_(need_grad)
        active = kd_w != 0
        with torch.enable_grad():
            ce = zs.new_zeros(zs.shape[0])
            if targets is not None:
                ce = F.cross_entropy(zs, targets, ignore_index=IGNORE_INDEX, reduction="none")
            d = zs.new_zeros(zs.shape[0])
            if bool(active.any()):
                d_active = divergence(rows, active, F.log_softmax(zs[active] / tau, dim=-1))
                d = d.masked_scatter(active, d_active.to(d.dtype))
            grad = None
            if need_grad:
                objective = (ce * ce_w).sum() + (torch.where(active, d, 0.0) * kd_w).sum()
                (grad,) = torch.autograd.grad(objective, zs)
        return ce.detach(), d.detach(), grad

    return chunk


def cross_vocab_chunks(
    h_t: torch.Tensor,
    w_t: torch.Tensor,
    b_t: torch.Tensor | None,
    shared_s: torch.Tensor,
    shared_t: torch.Tensor,
    opts: dict,
) -> Callable:
    """The chunk function (:func:`autograd_chunks`) of a teacher with another vocabulary.

    ``h_t [N, d_t]``: the teacher's hidden state for each of the ``N`` student rows (rows whose ``kd_w`` is
    0 are not read); ``w_t [V_T, d_t]`` / ``b_t``: its head. ``opts``: ``kind``, ``temperature``, ``beta``,
    ``alpha``, ``teacher_dtype``. The divergence is :func:`cross_vocab_divergence`.
    """
    tau = float(opts["temperature"])
    wt = w_t.detach().to(opts["teacher_dtype"])
    bt = None if b_t is None else b_t.detach().to(opts["teacher_dtype"])

    def divergence(rows, active, log_p_s):
        zt = head_logits(h_t[rows][active].detach().to(wt.dtype), wt, bt)
        return cross_vocab_divergence(
            log_p_s,
            F.log_softmax(zt / tau, dim=-1),
            shared_s,
            shared_t,
            kind=opts["kind"],
            beta=opts["beta"],
            alpha=opts["alpha"],
        )

    return autograd_chunks(divergence, tau)


def pool_visual(h: torch.Tensor, n_out: int) -> torch.Tensor:
    """``[B, n, d]`` visual hidden states average-pooled to ``[B, n_out, d]`` (``n_out <= n``).

    Square counts (``n = g^2``, ``n_out = g_out^2``): 2-D adaptive average pooling of the ``g x g`` grid
    (row-major, as the projector emits it); otherwise 1-D adaptive average pooling along the sequence.
    Returns ``h`` itself when ``n == n_out``.
    """
    b, n, dim = h.shape
    if n == n_out:
        return h
    if n_out > n or n_out < 1:
        raise ValueError(f"cannot pool {n} visual positions to {n_out}")
    g, g_out = math.isqrt(n), math.isqrt(n_out)
    if g * g == n and g_out * g_out == n_out:
        grid = h.transpose(1, 2).reshape(b, dim, g, g)
        return F.adaptive_avg_pool2d(grid, g_out).reshape(b, dim, n_out).transpose(1, 2)
    return F.adaptive_avg_pool1d(h.transpose(1, 2), n_out).transpose(1, 2)


def cross_tokenizer_loss(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    labels: torch.Tensor,
    weights: Mapping[str, float],
    teacher_hidden: torch.Tensor,
    teacher_head_weight: torch.Tensor,
    align_student: torch.Tensor,
    align_teacher: torch.Tensor,
    shared: tuple[torch.Tensor, torch.Tensor],
    settings: DistillSettings,
    vis_mask: torch.Tensor | None = None,
    teacher_vis_mask: torch.Tensor | None = None,
    num_visual_tokens: int = 0,
    teacher_visual_tokens: int = 0,
    chunk_size: int = 256,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_gram: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A micro-batch's objective against a teacher with another tokenizer, from hidden states.

    CE at every response position of the student; MDist_resp (:func:`cross_vocab_divergence`) at the
    aligned ones, mean over them; MDist_vis at the pooled visual positions (:func:`pool_visual`), mean over
    them; RDist on the pooled visual rows. Each MDist is times tau^2, like the same-vocabulary terms.

    Args:
        student_hidden: ``[B, T, d]``; labels: ``[B, T]`` unshifted; vis_mask: bool ``[B, T]``.
        teacher_hidden: ``[B, T_t, d_t]`` of the teacher's own encoding; teacher_vis_mask: bool ``[B, T_t]``.
        align_student / align_teacher: ``[B, A]`` aligned positions (-1: none), see
            :func:`mllm_kd.data.cross_tokens.align_positions`.
        shared: ``(student ids [S], teacher ids [S])`` of the shared tokens.
        weights: ``{"ce", "mdist_resp", "mdist_vis", "rdist"}``; teacher_gram: optional ``head_gram`` of
            the teacher's head (RDist; computed here when None).
    Returns:
        ``(total, terms)``: ``total`` is differentiable; ``terms`` the unweighted values, detached, and
        ``aligned``, the fraction of response positions that have a teacher position.
    """
    bsz, t_len = labels.shape
    device = student_hidden.device
    resp = response_mask(labels)
    t_index = torch.full((bsz, t_len), -1, dtype=torch.long, device=device)
    has = align_student >= 0
    rows_b = torch.arange(bsz, device=device).unsqueeze(1).expand_as(align_student)
    t_index[rows_b[has], align_student[has]] = align_teacher[has].to(device)
    b_of_row = resp.nonzero()[:, 0]
    t_of_row = t_index[resp]
    ht_rows = [teacher_hidden[b_of_row, t_of_row.clamp(min=0)]]
    hs_vis, rel_t = None, None
    images = vis_mask is not None and teacher_vis_mask is not None and bool(vis_mask.any())
    if images and (settings.vis or settings.rel):
        hs = student_hidden[vis_mask].view(-1, num_visual_tokens, student_hidden.shape[-1])
        ht = teacher_hidden[teacher_vis_mask].view(-1, teacher_visual_tokens, teacher_hidden.shape[-1])
        if hs.shape[0] != ht.shape[0]:
            raise CompatibilityError(
                f"the batch holds {hs.shape[0]} images for the student but {ht.shape[0]} for the teacher"
            )
        n = min(num_visual_tokens, teacher_visual_tokens)
        hs_vis, ht = pool_visual(hs, n), pool_visual(ht.detach(), n)
        if settings.rel:
            gram_t = teacher_gram
            if gram_t is None:
                with torch.no_grad():
                    gram_t = head_gram(
                        teacher_head_weight.detach(), None if teacher_bias is None else teacher_bias.detach()
                    )
            with torch.no_grad(), torch.autocast(ht.device.type, enabled=False):
                rel_t = relation_matrix(ht, gram_t, teacher_bias is not None)
        if settings.vis:
            ht_rows.append(ht.reshape(-1, ht.shape[-1]))
    h_t = torch.cat(ht_rows).detach()
    opts = {
        "kind": settings.kind,
        "temperature": settings.temperature,
        "beta": settings.beta,
        "alpha": settings.alpha,
        "teacher_dtype": compute_dtype(h_t, teacher_head_weight),
    }
    chunks = cross_vocab_chunks(
        h_t, teacher_head_weight, teacher_bias, shared[0].to(device), shared[1].to(device), opts
    )
    return cross_terms(
        student_hidden, student_head_weight, student_bias, labels, weights, settings,
        t_of_row >= 0, hs_vis, rel_t, chunks, chunk_size,
    )  # fmt: skip


def cross_terms(
    student_hidden: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    labels: torch.Tensor,
    weights: Mapping[str, float],
    settings: DistillSettings,
    aligned: torch.Tensor,
    visual: torch.Tensor | None,
    rel_t: torch.Tensor | None,
    chunks: Callable,
    chunk_size: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The terms of :func:`cross_tokenizer_loss` once the teacher's side is known, whatever its source (the
    teacher's hidden states, or a cache: :mod:`mllm_kd.losses.cached_cross`).

    Rows, in the order ``chunks`` (a :data:`~mllm_kd.losses.kernel.ChunkFn`) reads its teacher data: the
    student's response positions (row-major), then, when ``settings.vis``, the pooled visual rows
    ``visual [n_images, n, d]`` (image-major). ``aligned``: bool ``[n_resp]``, the response rows that have a
    teacher row (MDist_resp; the others keep their CE only). ``rel_t``: ``[n_images, n, n]`` the teacher's
    relation matrices of the pooled grid (any scale), or None.
    """
    tau2 = settings.temperature**2
    w = {k: float(weights.get(k, 0.0)) for k in ("ce", "mdist_resp", "mdist_vis", "rdist")}
    device = student_hidden.device
    resp = response_mask(labels)
    targets_full = torch.full_like(labels, IGNORE_INDEX)
    targets_full[:, :-1] = labels[:, 1:]
    n_resp, n_aligned = int(resp.sum()), int(aligned.sum())
    h_rows = [student_hidden[resp]]
    targets = [targets_full[resp]]
    ce_w = [torch.full((n_resp,), w["ce"] / max(n_resp, 1), device=device)]
    kd_w = [aligned.float() * (w["mdist_resp"] * tau2 / max(n_aligned, 1) if settings.resp else 0.0)]
    rdist, gram_grad, n_vis = None, None, 0
    if visual is not None and settings.rel:
        rdist, gram_grad = relation_term(visual, head_weight, head_bias, rel_t, w["rdist"])
    if visual is not None and settings.vis:
        n_vis = visual.shape[0] * visual.shape[1]
        h_rows.append(visual.reshape(n_vis, -1))
        targets.append(torch.full((n_vis,), IGNORE_INDEX, dtype=torch.long, device=device))
        ce_w.append(torch.zeros(n_vis, device=device))
        kd_w.append(torch.full((n_vis,), w["mdist_vis"] * tau2 / max(n_vis, 1), device=device))
    h_all = torch.cat(h_rows)
    total, ce, d = head_loss(
        h_all,
        head_weight,
        head_bias,
        torch.cat(targets),
        torch.cat(ce_w),
        torch.cat(kd_w),
        chunks,
        compute_dtype(h_all, head_weight),
        chunk_size,
        gram_grad,
    )
    zero = total.detach() * 0.0
    terms = {"ce": ce[:n_resp].mean().detach() if n_resp else zero}
    if settings.resp:
        terms["mdist_resp"] = (d[:n_resp][aligned].mean() * tau2).detach() if n_aligned else zero
    if settings.vis and visual is not None:
        terms["mdist_vis"] = (d[n_resp:].mean() * tau2).detach() if n_vis else zero
    if rdist is not None:
        terms["rdist"] = rdist.detach()
        if w["rdist"] != 0:
            total = total + w["rdist"] * rdist
    terms["aligned"] = torch.tensor(n_aligned / max(n_resp, 1), device=device)
    return total, terms
