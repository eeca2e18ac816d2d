"""The online teacher's side of the chunked-head kernel: per chunk, the student's and the teacher's
logits, CE and the divergence per row, and the gradient wrt the student's logits in closed form.

:func:`online_chunks` is the chunk function that :func:`mllm_kd.losses.kernel.head_loss` calls. At most
3 float32 ``[chunk, V]`` buffers exist at a time (4 for jsd / skl, or CE with tau != 1). A chunk whose
values are not finite (e.g. ``-inf`` teacher logits) is recomputed with the reference functions and
autograd, so such cases keep the reference semantics.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mllm_kd.losses.head import all_finite, head_logits
from mllm_kd.losses.reference import IGNORE_INDEX, KD_KINDS, divergence_from_logprobs


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """A new tensor ``log(weight_p p + (1 - weight_p) q)`` (as ``losses._log_mixture``, fewer temporaries)."""
    if weight_p <= 0.0:
        return log_q.clone()
    if weight_p >= 1.0:
        return log_p.clone()
    log_w, log_1mw = math.log(weight_p), math.log1p(-weight_p)
    out = log_p + (log_w - log_1mw)
    torch.logaddexp(out, log_q, out=out)
    return out.add_(log_1mw)


def _divergence_and_grad(
    a: torch.Tensor, b: torch.Tensor, kind: str, beta: float, alpha: float, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Divergence per row and its gradient wrt the student's (temperature-scaled) logits.

    ``a``, ``b``: ``[c, V]`` float32 student / teacher log-probabilities; both are consumed (overwritten).
    Returns ``(D [c], g, sum_g [c], P)`` where ``P = exp(a)`` and the gradient of ``D`` with respect to
    the student logits is ``g - P * sum_g[:, None]`` (``g`` is dD/d log p_S: that is how log_softmax's
    backward composes). ``g``, ``sum_g``, ``P`` are None unless ``need_grad``.
    """
    if kind == "fkl":  # D = sum q (b - a); dD/da = -q
        q = b.exp()
        d = b.sub_(a).mul_(q).sum(-1)
        del b
        if not need_grad:
            return d, None, None, None
        g = q.neg_()
        return d, g, g.sum(-1), a.exp_()
    if kind == "rkl":  # D = sum p (a - b); dD/da = p (a - b) + p
        amb = b.neg_().add_(a)
        p = a.exp_()
        g = amb.mul_(p)
        d = g.sum(-1)
        if not need_grad:
            return d, None, None, None
        g.add_(p)
        return d, g, g.sum(-1), p
    if kind == "jsd":  # m = log(beta q + (1-beta) p); D = beta KL(q||m) + (1-beta) KL(p||m)
        if beta <= 0.0 or beta >= 1.0:  # the ends are the KLs JSD(beta) interpolates (GKD): fkl, rkl
            return _divergence_and_grad(a, b, "fkl" if beta <= 0.0 else "rkl", beta, alpha, need_grad)
        m = _log_mix(b, a, beta)
        q = b.exp()
        t1 = b.sub_(m).mul_(q).sum(-1)
        del q
        p = torch.exp(a, out=b)
        a.sub_(m)  # a - m
        pam = torch.mul(p, a, out=m)  # p (a - m)
        t2 = pam.sum(-1)
        d = beta * t1 + (1.0 - beta) * t2
        if not need_grad:
            return d, None, None, None
        # dD/da = (1-beta) p (a - m): the mixture's own derivative terms cancel for 0 < beta < 1.
        g = pam.mul_(1.0 - beta)
        return d, g, (1.0 - beta) * t2, p
    if kind == "skl":  # m = log(alpha q + (1-alpha) p); D = sum q (b - m); dD/da = -(1-alpha) q p / e^m
        m = _log_mix(b, a, alpha)
        q = b.exp()
        d = b.sub_(m).mul_(q).sum(-1)
        if not need_grad:
            return d, None, None, None
        w = 0.0 if alpha >= 1.0 else 1.0 - alpha
        g = torch.sub(a, m, out=b).exp_().mul_(q).mul_(-w)
        del q, m
        return d, g, g.sum(-1), a.exp_()
    if kind == "srkl":  # m = log(alpha p + (1-alpha) q); D = sum p (a - m); dD/da = p (a - m + 1 - w)
        m = _log_mix(a, b, alpha)
        amm = torch.sub(a, m, out=b)
        p = a.exp_()
        if need_grad:  # m := (a - m) + 1 - w with w = alpha p / e^m = alpha e^(a - m)
            w = 0.0 if alpha <= 0.0 else min(alpha, 1.0)
            m.copy_(amm).exp_().mul_(-w).add_(amm).add_(1.0)
        d = amm.mul_(p).sum(-1)
        if not need_grad:
            return d, None, None, None
        g = m.mul_(p)
        return d, g, g.sum(-1), p
    raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KD_KINDS}")


def _chunk_losses(
    student_logits: Callable[[], torch.Tensor],
    teacher_logits: Callable[[], torch.Tensor] | None,
    targets: torch.Tensor | None,
    ce_w: torch.Tensor,
    kd_w: torch.Tensor,
    opts: dict,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """CE and divergence per row of one chunk, and the gradient of ``sum(ce_w*CE + kd_w*D)`` wrt the
    student's logits.

    ``student_logits`` / ``teacher_logits`` return the chunk's fresh float32 ``[c, V]`` logits; they are
    called here, one after the other, so that this function owns (and frees) every ``[c, V]`` buffer: at
    most 3 (fkl, rkl, srkl) or 4 (jsd, skl; CE with tau != 1) exist at a time. Returns
    ``(ce [c], D [c], grad [c, V])``, or None when a value is not finite (the caller then uses
    :func:`_chunk_reference`).
    """
    tau = opts["temperature"]
    zs = student_logits()
    c = zs.shape[0]
    valid = safe = None
    ce = zs.new_zeros(c)
    grad_ce = None
    if targets is not None:
        valid = targets != IGNORE_INDEX
        safe = targets.masked_fill(~valid, 0).unsqueeze(1)
    if valid is not None and (teacher_logits is None or tau != 1.0):
        log_p1 = F.log_softmax(zs, dim=-1)
        ce = torch.where(valid, -log_p1.gather(1, safe).squeeze(1), 0.0)
        if need_grad:
            grad_ce = log_p1.exp_().mul_(ce_w[:, None])
        del log_p1
    if teacher_logits is None:
        del zs
        if not all_finite(ce):
            return None
        if grad_ce is not None:
            grad_ce.scatter_add_(1, safe, (-ce_w * valid).unsqueeze(1))
        return ce, torch.zeros_like(ce), grad_ce
    if tau != 1.0:
        zs.div_(tau)
    a = F.log_softmax(zs, dim=-1)
    del zs
    zt = teacher_logits()
    if tau != 1.0:
        zt.div_(tau)
    b = F.log_softmax(zt, dim=-1)
    del zt
    if valid is not None and tau == 1.0:
        ce = torch.where(valid, -a.gather(1, safe).squeeze(1), 0.0)
    d, g, sum_g, p = _divergence_and_grad(a, b, opts["kind"], opts["beta"], opts["alpha"], need_grad)
    del a, b
    if not all_finite(d, ce, *([sum_g] if need_grad else [])):  # sum_g: non-finite if any of g is
        return None
    if not need_grad:
        return ce, d, None
    coef = kd_w / tau  # d(kd_w * D)/dz = kd_w / tau * dD/ds
    grad = g.mul_(coef[:, None])
    row = coef * sum_g
    if valid is not None and grad_ce is None:  # tau == 1: the CE gradient ce_w * (p - onehot) shares p
        row = row - ce_w
    grad.sub_(p.mul_(row[:, None]))
    del p
    if grad_ce is not None:
        grad.add_(grad_ce)
    if valid is not None:
        grad.scatter_add_(1, safe, (-ce_w * valid).unsqueeze(1))
    return ce, d, grad


def _chunk_reference(
    student_logits: Callable[[], torch.Tensor],
    teacher_logits: Callable[[], torch.Tensor] | None,
    targets: torch.Tensor | None,
    ce_w: torch.Tensor,
    kd_w: torch.Tensor,
    opts: dict,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The same as :func:`_chunk_losses` with the reference functions and autograd (non-finite chunks)."""
    tau = opts["temperature"]
    zs = student_logits().detach().requires_grad_(need_grad)
    zt = None if teacher_logits is None else teacher_logits()
    with torch.enable_grad():
        ce = zs.new_zeros(zs.shape[0])
        if targets is not None:
            ce = F.cross_entropy(zs, targets, ignore_index=IGNORE_INDEX, reduction="none")
        d = zs.new_zeros(zs.shape[0])
        if zt is not None:
            d = divergence_from_logprobs(
                F.log_softmax(zs / tau, dim=-1),
                F.log_softmax(zt / tau, dim=-1),
                kind=opts["kind"],
                beta=opts["beta"],
                alpha=opts["alpha"],
            )
        grad = None
        if need_grad:
            objective = (
                torch.where(ce_w != 0, ce * ce_w, 0.0).sum() + torch.where(kd_w != 0, d * kd_w, 0.0).sum()
            )
            (grad,) = torch.autograd.grad(objective, zs)
    return ce.detach(), d.detach(), grad


def online_chunks(
    h_t: torch.Tensor | None, w_t: torch.Tensor | None, b_t: torch.Tensor | None, opts: dict
) -> Callable:
    """The chunk function of an online teacher (``h_t [N, d_t]`` and its head, detached; None: CE only).

    ``opts``: ``kind``, ``temperature``, ``beta``, ``alpha`` and ``teacher_dtype`` (the teacher's matmul).
    """
    wt = bt = None
    if h_t is not None:
        wt = w_t.to(opts["teacher_dtype"])
        bt = None if b_t is None else b_t.to(opts["teacher_dtype"])

    def chunk(rows, student_logits, targets, ce_w, kd_w, need_grad):
        teacher_logits = None
        if h_t is not None:

            def teacher_logits():
                return head_logits(h_t[rows].to(wt.dtype), wt, bt)

        args = (student_logits, teacher_logits, targets, ce_w, kd_w, opts, need_grad)
        out = _chunk_losses(*args)
        return out if out is not None else _chunk_reference(*args)

    return chunk
