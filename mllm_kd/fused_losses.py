"""Fused, chunked LLaVA-KD losses computed from final hidden states and LM-head weights.

The logits-level references live in :mod:`mllm_kd.losses`; these functions compute the same values and
gradients without ever holding a ``[positions, V]`` tensor of either model for more than one chunk:

* :func:`fused_kd_divergence` — MDist (:func:`~mllm_kd.losses.kd_divergence`) over already-masked
  positions, from ``hidden [N, d]`` and the head ``weight [V, d]`` (+ optional ``bias [V]``).
* :func:`fused_cross_entropy` / :func:`fused_causal_lm_loss` — next-token cross-entropy from hidden states.
* :func:`fused_relation_distill` — RDist (:func:`~mllm_kd.losses.relation_distill`) with
  ``Z Z^T = H (W^T W) H^T``: no vocabulary-sized tensor at all (a bias is folded in as an extra column).
* :func:`fused_distill_loss` — the whole objective of a micro-batch (CE + MDist_resp + MDist_vis + RDist)
  in one pass over the positions, as :class:`~mllm_kd.engine.LossComputer` uses it.

How memory stays bounded. The per-position losses (CE, MDist) go through one ``autograd.Function`` that
walks the positions ``chunk_size`` at a time: it computes the chunk's student and teacher logits, the
loss values and — in the forward pass already — the gradient of the (weighted) loss with respect to the
chunk's student logits, in closed form. That ``[chunk, V]`` gradient is immediately pushed through the
head (``grad_hidden[chunk] = G @ W``; ``grad_W += G^T @ hidden[chunk]``; ``grad_b += G.sum(0)``) and
freed. At most 3 float32 ``[chunk, V]`` buffers exist at a time (4 for jsd / skl, or CE with tau != 1).
Only ``grad_hidden [N, d]`` and ``grad_W [V, d]`` (the size of the head, float32) are kept for the
backward pass, which merely scales them by the incoming gradient. So forward + backward cost the same
four ``N x V x d`` matmuls as the logits path (student and teacher logits, two gradient products) and
never store logits. Several terms share one pass (and one ``grad_W``) when their weights are known, which
is why :func:`fused_distill_loss` returns one differentiable ``total`` and detached per-term values;
there RDist's share of the head gradient, ``W (dG + dG^T)`` for ``G = W^T W``, is added to the same
``grad_W`` in the forward pass too, so a step holds a single head-sized gradient.

All loss math is float32. The logits matmuls run in the inputs' dtype — or the autocast dtype when
autocast is on, exactly like the reference ``lm_head`` — and are cast to float32 before any softmax.
A chunk whose values are not finite (e.g. ``-inf`` teacher logits) is recomputed with the reference
functions and autograd, so such cases keep the reference semantics. The teacher is a constant here:
no gradient flows to ``teacher_*`` tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mllm_kd.losses import (
    IGNORE_INDEX,
    KD_KINDS,
    DistillSettings,
    divergence_from_logprobs,
    relation_loss_from_gram,
    response_mask,
)

DEFAULT_CHUNK = 1024
# Text-config fields of models whose logits are not plain ``lm_head(hidden)``.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")
_GRAM_ROWS = 16384  # vocabulary rows per step when W^T W needs a cast or a bias column


# ----------------------------------------------------------------------------------- per-chunk math
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
        if beta <= 0.0 or beta >= 1.0:  # m equals one of the two: D = 0 identically
            d = a.new_zeros(a.shape[0])
            if not need_grad:
                return d, None, None, None
            return d, b.zero_(), d.clone(), a.exp_()
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


# ------------------------------------------------------------------------------ the fused function
def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when on (as for ``lm_head``), else the inputs'."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    z = torch.mm(h, w.t()) if b is None else torch.addmm(b, h, w.t())
    return z.float()


def push_through_head(
    grad: torch.Tensor,
    hs: torch.Tensor,
    ws: torch.Tensor,
    rows: slice,
    grad_h: torch.Tensor | None,
    grad_w: torch.Tensor | None,
    grad_b: torch.Tensor | None,
) -> None:
    """Accumulate a chunk's float32 logits gradient ``grad [c, V]`` into the head's float32 gradients.

    ``grad_h[rows] = G @ W``, ``grad_W += G^T @ H``, ``grad_b += G.sum(0)``; the two matmuls run in the
    dtype of ``hs`` / ``ws`` (the compute dtype: bf16 under autocast, as the logits' backward would), with
    ``grad_W`` accumulated in float32 a block of vocabulary rows at a time, so no ``[V, d]`` low-precision
    temporary exists. ``grad`` is consumed.
    """
    if grad_b is not None:
        grad_b.add_(grad.sum(0))
    cdtype = ws.dtype
    grad = grad.to(cdtype)
    if grad_h is not None:
        grad_h[rows] = torch.mm(grad, ws)
    if grad_w is not None:
        if cdtype == torch.float32:
            grad_w.addmm_(grad.t(), hs)
        else:
            for v0 in range(0, grad.shape[1], _GRAM_ROWS):
                grad_w[v0 : v0 + _GRAM_ROWS].add_(torch.mm(grad[:, v0 : v0 + _GRAM_ROWS].t(), hs))


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every element of the (small) tensors is finite: one host synchronisation for all of them."""
    return bool(torch.isfinite(torch.cat([t.reshape(-1) for t in tensors])).all())


class _FusedHeadLoss(torch.autograd.Function):
    """``total = sum_i ce_w[i] CE_i + kd_w[i] D_i`` from hidden states and head weights, chunk by chunk.

    Gradients are computed during the forward pass (see the module docstring); backward scales them.
    Outputs: ``total`` (differentiable), per-row ``CE [N]`` and divergence ``D [N]`` (not differentiable).
    """

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, targets, ce_w, kd_w, gram_grad, opts):
        # needs_input_grad ignores torch.no_grad(); the wrapper records whether gradients are wanted at all.
        need_h, need_w, need_b = (flag and opts["grad_enabled"] for flag in ctx.needs_input_grad[:3])
        need_grad = need_h or need_w or need_b
        n, v = h_s.shape[0], w_s.shape[0]
        chunk = max(1, int(opts["chunk_size"]))
        cdtype = opts["compute_dtype"]
        with torch.autocast(h_s.device.type, enabled=False):
            ws = w_s.to(cdtype)
            bs = None if b_s is None else b_s.to(cdtype)
            wt = bt = None
            if h_t is not None:
                wt = w_t.to(opts["teacher_dtype"])
                bt = None if b_t is None else b_t.to(opts["teacher_dtype"])
            ce_all = h_s.new_zeros(n, dtype=torch.float32)
            d_all = h_s.new_zeros(n, dtype=torch.float32)
            grad_h = h_s.new_zeros(n, h_s.shape[1], dtype=torch.float32) if need_h else None
            has_work = n > 0 or gram_grad is not None
            grad_w = h_s.new_zeros(v, h_s.shape[1], dtype=torch.float32) if need_w and has_work else None
            grad_b = h_s.new_zeros(v, dtype=torch.float32) if need_b and has_work else None
            for i0 in range(0, n, chunk):
                i1 = min(n, i0 + chunk)
                hs = h_s[i0:i1].to(cdtype)
                tg = None if targets is None else targets[i0:i1]
                args = (tg, ce_w[i0:i1], kd_w[i0:i1], opts, need_grad)

                def student_logits(hs=hs):
                    return _logits(hs, ws, bs)

                teacher_logits = None
                if h_t is not None:

                    def teacher_logits(i0=i0, i1=i1):
                        return _logits(h_t[i0:i1].to(wt.dtype), wt, bt)

                out = _chunk_losses(student_logits, teacher_logits, *args)
                if out is None:
                    out = _chunk_reference(student_logits, teacher_logits, *args)
                ce, d, grad = out
                del out  # the float32 gradient must not outlive its cast below
                ce_all[i0:i1], d_all[i0:i1] = ce, d
                if grad is not None:
                    push_through_head(grad, hs, ws, slice(i0, i1), grad_h, grad_w, grad_b)
                    del grad
            if gram_grad is not None:  # another term's gradient through W^T W: d/d[W|b] = [W|b] @ gram_grad
                _add_gram_grad(w_s, b_s, gram_grad, grad_w, grad_b)
            total = (
                torch.where(ce_w != 0, ce_all * ce_w, 0.0).sum()
                + torch.where(kd_w != 0, d_all * kd_w, 0.0).sum()
            )
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        ctx.mark_non_differentiable(ce_all, d_all)
        return total, ce_all, d_all

    @staticmethod
    def backward(ctx, g_total, _g_ce, _g_d):
        if ctx.grads is None:
            raise RuntimeError(
                "the fused head loss was already backpropagated once (its gradients are precomputed); "
                "use the reference losses (loss.fused=false) for retain_graph / double backward"
            )
        grads, ctx.grads = ctx.grads, None
        out = []
        for g, dtype in zip(grads, ctx.dtypes):
            if g is not None:
                g = g.mul_(g_total) if not (g_total == 1).all() else g
                g = g.to(dtype)
            out.append(g)
        return (*out, None, None, None, None, None, None, None, None)


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
    gram_grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if kind not in KD_KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {KD_KINDS}")
    if not 0.0 <= beta <= 1.0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"beta and alpha must lie in [0, 1], got beta={beta}, alpha={alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if h_s.ndim != 2 or w_s.ndim != 2 or h_s.shape[1] != w_s.shape[1]:
        raise ValueError(f"student hidden {tuple(h_s.shape)} and head weight {tuple(w_s.shape)} do not match")
    opts = {
        "kind": kind,
        "temperature": float(temperature),
        "beta": float(beta),
        "alpha": float(alpha),
        "chunk_size": chunk_size,
        "compute_dtype": _compute_dtype(h_s, w_s),
        "grad_enabled": torch.is_grad_enabled(),
    }
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
        opts["teacher_dtype"] = _compute_dtype(h_t, w_t)
    ce_w = ce_w.to(device=h_s.device, dtype=torch.float32)
    kd_w = kd_w.to(device=h_s.device, dtype=torch.float32)
    return _FusedHeadLoss.apply(h_s, w_s, b_s, h_t, w_t, b_t, targets, ce_w, kd_w, gram_grad, opts)


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
        kind, temperature, beta, alpha: see :func:`mllm_kd.losses.divergence_from_logprobs`.
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
    """:func:`mllm_kd.losses.causal_lm_loss` from ``hidden [B, T, d]``: only supervised positions are used."""
    mask = response_mask(labels)
    targets = labels[:, 1:][mask[:, :-1]]
    return fused_cross_entropy(hidden[mask], head_weight, targets, chunk_size=chunk_size, bias=bias)


# ---------------------------------------------------------------------------------------- public: RDist
class _HeadGram(torch.autograd.Function):
    """``[W | b]^T [W | b]`` in float32 (``[d', d']``, ``d' = d + 1`` with a bias), chunked over V."""

    @staticmethod
    def forward(ctx, w, b):
        with torch.autocast(w.device.type, enabled=False):
            if b is None and w.dtype == torch.float32:
                gram = torch.mm(w.t(), w)
            else:
                dim = w.shape[1] + (b is not None)
                gram = w.new_zeros(dim, dim, dtype=torch.float32)
                for v0 in range(0, w.shape[0], _GRAM_ROWS):
                    x = _augment(w[v0 : v0 + _GRAM_ROWS], None if b is None else b[v0 : v0 + _GRAM_ROWS])
                    gram.addmm_(x.t(), x)
        ctx.save_for_backward(w, b)
        return gram

    @staticmethod
    def backward(ctx, d_gram):
        w, b = ctx.saved_tensors
        s = (d_gram + d_gram.t()).float()  # d(X^T X) = X (dG + dG^T)
        need_w, need_b = ctx.needs_input_grad[:2]
        with torch.autocast(w.device.type, enabled=False):
            if b is None and w.dtype == torch.float32:
                return torch.mm(w, s) if need_w else None, None
            grad_w = torch.empty_like(w) if need_w else None
            grad_b = torch.empty_like(b) if need_b else None
            d = w.shape[1]
            for v0 in range(0, w.shape[0], _GRAM_ROWS):
                v1 = min(w.shape[0], v0 + _GRAM_ROWS)
                y = _augment(w[v0:v1], None if b is None else b[v0:v1]) @ s
                if grad_w is not None:
                    grad_w[v0:v1] = y[:, :d]
                if grad_b is not None:
                    grad_b[v0:v1] = y[:, d]
        return grad_w, grad_b


def _augment(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    x = w.float()
    return x if b is None else torch.cat([x, b.float().unsqueeze(1)], dim=1)


def head_gram(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``W^T W`` (``[d, d]``, float32), or ``[W | b]^T [W | b]`` (``[d+1, d+1]``) with a bias.

    Differentiable wrt ``weight`` and ``bias``; never allocates more than one weight-sized tensor.
    """
    return _HeadGram.apply(weight, bias)


def _add_gram_grad(
    w: torch.Tensor,
    b: torch.Tensor | None,
    s: torch.Tensor,
    grad_w: torch.Tensor | None,
    grad_b: torch.Tensor | None,
) -> None:
    """``grad_[W|b] += [W|b] @ s`` in float32 (``s``: ``[d', d']``), a block of vocabulary rows at a time."""
    if b is None and w.dtype == torch.float32:
        if grad_w is not None:
            grad_w.addmm_(w, s)
        return
    d = w.shape[1]
    for v0 in range(0, w.shape[0], _GRAM_ROWS):
        v1 = min(w.shape[0], v0 + _GRAM_ROWS)
        y = _augment(w[v0:v1], None if b is None else b[v0:v1]) @ s
        if grad_w is not None:
            grad_w[v0:v1] += y[:, :d]
        if grad_b is not None:
            grad_b[v0:v1] += y[:, d]


def _rdist_from_grams(
    hs: torch.Tensor, gram_s: torch.Tensor, s_bias: bool, ht: torch.Tensor, gram_t: torch.Tensor, t_bias: bool
) -> torch.Tensor:
    """``1 - cos`` of ``H_S G_S H_S^T`` and ``H_T G_T H_T^T`` (``[B, n, d]`` hidden, float32 math)."""

    def relation(h: torch.Tensor, gram: torch.Tensor, bias: bool) -> torch.Tensor:
        h = h.float()
        if bias:  # Z = [H 1] [W b]^T
            h = torch.cat([h, h.new_ones(*h.shape[:-1], 1)], dim=-1)
        if h.shape[-1] != gram.shape[0]:
            raise ValueError(
                f"hidden states {tuple(h.shape)} do not match the head's Gram {tuple(gram.shape)}"
            )
        return (h @ gram) @ h.transpose(1, 2)

    with torch.autocast(hs.device.type, enabled=False):
        return relation_loss_from_gram(relation(hs, gram_s, s_bias), relation(ht, gram_t, t_bias))


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
    """RDist from hidden states: equals :func:`mllm_kd.losses.relation_distill` of the visual logits.

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
    return _rdist_from_grams(
        hs, gram_s, student_bias is not None, ht.detach(), gram_t, teacher_bias is not None
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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A micro-batch's objective from hidden states: ``sum_k weights[k] * term_k`` over nonzero weights.

    The same terms as ``causal_lm_loss`` + :func:`mllm_kd.losses.distill_terms` on the logits: CE and
    MDist_resp at the response positions (hidden at t predicts label t+1), MDist_vis at the visual
    positions (unshifted), RDist per image (visual positions in row-major order, ``num_visual_tokens`` per
    image). CE and both MDist terms share one chunked pass over the union of those positions.

    Args:
        student_hidden: ``[B, T, d]``; labels: ``[B, T]`` unshifted; vis_mask: bool ``[B, T]``.
        weights: ``{"ce", "mdist_resp", "mdist_vis", "rdist"}`` (missing keys count as 0).
        teacher_hidden: ``[B, T, d_t]`` or None (CE only); settings: which distillation terms, kind, tau.
        with_ce: False leaves CE out (no ``"ce"`` term).
    Returns:
        ``(total, terms)``: ``total`` is differentiable; ``terms`` holds the unweighted values, detached.
    """
    settings = settings or DistillSettings()
    distill = teacher_hidden is not None
    resp = response_mask(labels)
    use_resp = distill and settings.resp
    use_vis = distill and settings.vis and vis_mask is not None
    use_rel = distill and settings.rel and vis_mask is not None
    rows = resp if (with_ce or use_resp) else torch.zeros_like(resp)
    if use_vis:
        rows = rows | vis_mask
    targets_full = torch.full_like(labels, IGNORE_INDEX)
    targets_full[:, :-1] = labels[:, 1:]
    is_resp, targets = resp[rows], targets_full[rows]
    is_vis = vis_mask[rows] if use_vis else torch.zeros_like(is_resp)
    n_resp, n_vis = int(is_resp.sum()), int(is_vis.sum())
    w = {k: float(weights.get(k, 0.0)) for k in ("ce", "mdist_resp", "mdist_vis", "rdist")}
    tau2 = settings.temperature**2
    ce_w = (
        is_resp.float() * (w["ce"] / max(n_resp, 1))
        if with_ce
        else torch.zeros_like(is_resp, dtype=torch.float32)
    )
    kd_w = torch.zeros_like(ce_w)
    if use_resp:
        kd_w = kd_w + is_resp.float() * (w["mdist_resp"] * tau2 / max(n_resp, 1))
    if use_vis:
        kd_w = kd_w + is_vis.float() * (w["mdist_vis"] * tau2 / max(n_vis, 1))
    rdist, gram_grad = None, None
    if use_rel:
        rdist, gram_grad = _objective_rdist(
            student_hidden[vis_mask].view(-1, num_visual_tokens, student_hidden.shape[-1]),
            student_head_weight,
            student_bias,
            teacher_hidden[vis_mask].view(-1, num_visual_tokens, teacher_hidden.shape[-1]),
            _teacher_gram(teacher_head_weight, teacher_bias, teacher_gram),
            teacher_bias is not None,
            w["rdist"],
        )
    total, ce, d = _fused_head_loss(
        student_hidden[rows],
        student_head_weight,
        student_bias,
        teacher_hidden[rows] if (use_resp or use_vis) else None,
        teacher_head_weight,
        teacher_bias,
        targets if with_ce else None,
        ce_w,
        kd_w,
        kind=settings.kind,
        temperature=settings.temperature,
        beta=settings.beta,
        alpha=settings.alpha,
        chunk_size=chunk_size,
        gram_grad=gram_grad,
    )
    zero = total.detach() * 0.0
    terms: dict[str, torch.Tensor] = {}
    if with_ce:
        terms["ce"] = ce[is_resp].mean() if n_resp else zero
    if use_resp:
        terms["mdist_resp"] = d[is_resp].mean() * tau2 if n_resp else zero
    if use_vis:
        terms["mdist_vis"] = d[is_vis].mean() * tau2 if n_vis else zero
    if rdist is not None:
        terms["rdist"] = rdist.detach()
        if w["rdist"] != 0:
            total = total + w["rdist"] * rdist
    return total, terms


def _objective_rdist(
    hs: torch.Tensor,
    ws: torch.Tensor,
    bs: torch.Tensor | None,
    ht: torch.Tensor,
    gram_t: torch.Tensor,
    t_bias: bool,
    weight: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RDist for :func:`fused_distill_loss`, and ``weight * dRDist/d(W^T W)`` symmetrised when the head trains.

    The head's share of the RDist gradient, ``[W|b] (dG + dG^T)``, is then added to the fused head loss's
    own ``grad_W`` (so only one ``[V, d]`` gradient buffer exists); the returned RDist carries gradients
    to the hidden states only.
    """
    head_trains = torch.is_grad_enabled() and (ws.requires_grad or (bs is not None and bs.requires_grad))
    if not head_trains or weight == 0:
        with torch.no_grad():
            gram_s = head_gram(ws, bs)
        return _rdist_from_grams(hs, gram_s, bs is not None, ht.detach(), gram_t, t_bias), None
    with torch.no_grad():
        gram_s = head_gram(ws, bs)
    gram_s.requires_grad_()
    rdist = _rdist_from_grams(hs, gram_s, bs is not None, ht.detach(), gram_t, t_bias)
    (d_gram,) = torch.autograd.grad(rdist, gram_s, retain_graph=True)
    return rdist, weight * (d_gram + d_gram.t())


def fusable_head(model: nn.Module) -> nn.Linear | None:
    """The LM head of a :class:`~mllm_kd.model.MultimodalLM` (or of a DDP wrapper of one) when the fused
    losses reproduce its logits exactly, else None (the caller then uses the logits reference).

    That is: the logits are ``head(hidden)`` for a plain ``nn.Linear`` head (bias allowed) with no hooks,
    not post-processed (soft-capping, logit scaling), and the weights are whole tensors (FSDP2 shards them
    outside the module's own forward).
    """
    from mllm_kd.model import MultimodalLM

    inner = getattr(model, "module", model)  # DistributedDataParallel
    if not isinstance(inner, MultimodalLM) or type(inner).forward is not MultimodalLM.forward:
        return None
    head = inner.llm.get_output_embeddings()
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None
    if any(type(p) is not nn.Parameter and type(p) is not torch.Tensor for p in head.parameters()):
        return None  # e.g. a DTensor (FSDP2-sharded)
    text_cfg = inner.llm.config.get_text_config()
    for name in _LOGIT_POSTPROCESSING:
        value = getattr(text_cfg, name, None)
        if value is not None and value != 1:
            return None
    return head
