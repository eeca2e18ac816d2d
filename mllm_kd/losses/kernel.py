"""The one chunked-head loss kernel, shared by the online fused loss and the cached-teacher loss.

``total = sum_i ce_w[i] CE_i + kd_w[i] D_i`` over ``N`` rows, from the student's final hidden states
``[N, d]`` and its LM head, without holding a ``[N, V]`` tensor for more than one chunk. What ``D`` is
(a divergence against an online teacher's logits, or against a cached top-k teacher) is the caller's
*chunk function*; this module owns everything else:

* :func:`head_loss` — the chunk loop. For each ``chunk_size`` rows it asks the chunk function for the
  rows' CE, divergence and the gradient of the weighted loss wrt the chunk's student logits, pushes that
  ``[chunk, V]`` gradient through the head at once (``grad_hidden = G @ W``, ``grad_W += G^T @ hidden``,
  ``grad_b += G.sum(0)``) and frees it. Only ``grad_hidden [N, d]`` and ``grad_W [V, d]`` (float32) are
  kept for the backward pass, which merely scales them by the incoming gradient.
* :func:`relation_term` — RDist from hidden states (``Z Z^T = H (W^T W) H^T``, or from the visual logits
  ``Z`` when there are few visual rows) against the teacher's relation matrices, and, when the head
  trains, RDist's share of the head gradient (:class:`HeadGrad`) that :func:`head_loss` adds to the same
  ``grad_W`` (one head-sized gradient per step).
* :func:`plan_rows` / :func:`collect_terms` — which rows of a ``[B, T]`` batch are distilled, their
  per-row weights, and the per-term values of the objective (CE, MDist_resp, MDist_vis, RDist).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from mllm_kd.errors import CompatibilityError
from mllm_kd.losses.head import add_gram_grad, head_gram, head_logits, push_through_head, relation_matrix
from mllm_kd.losses.reference import IGNORE_INDEX, DistillSettings, relation_loss_from_gram, response_mask

# (rows, student_logits, targets, ce_w, kd_w, need_grad) -> (ce [c], D [c], grad [c, V] or None).
# ``student_logits()`` returns the chunk's fresh float32 logits (the callee may overwrite them); the
# callee falls back to its own autograd reference when its closed form meets a non-finite value.
ChunkFn = Callable[
    [slice, Callable[[], torch.Tensor], "torch.Tensor | None", torch.Tensor, torch.Tensor, bool],
    tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"],
]


class _HeadLoss(torch.autograd.Function):
    """Gradients are computed during the forward pass (see the module docstring); backward scales them.
    Outputs: ``total`` (differentiable), per-row ``CE [N]`` and divergence ``D [N]`` (not differentiable).
    """

    @staticmethod
    def forward(ctx, h, w, b, targets, ce_w, kd_w, gram_grad, chunk_fn, opts):
        # needs_input_grad ignores torch.no_grad(); the wrapper records whether gradients are wanted at all.
        need_h, need_w, need_b = (flag and opts["grad_enabled"] for flag in ctx.needs_input_grad[:3])
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
                rows = slice(i0, min(n, i0 + chunk))
                hs = h[rows].to(cdtype)
                tg = None if targets is None else targets[rows]

                def student_logits(hs=hs):
                    return head_logits(hs, ws, bs)

                ce, d, grad = chunk_fn(rows, student_logits, tg, ce_w[rows], kd_w[rows], need_grad)
                ce_all[rows], d_all[rows] = ce, d
                if grad is not None:
                    push_through_head(grad, hs, ws, rows, grad_h, grad_w, grad_b)
                    del grad  # the float32 gradient must not outlive its cast
            if gram_grad is not None:  # another term's gradient through the head (RDist's)
                gram_grad.add_to(w, b, grad_w, grad_b)
            total = (
                torch.where(ce_w != 0, ce_all * ce_w, 0.0).sum()
                + torch.where(kd_w != 0, d_all * kd_w, 0.0).sum()
            )
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, w.dtype, None if b is None else b.dtype)
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
        return (*out, None, None, None, None, None, None)


def head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor | None,
    ce_w: torch.Tensor,
    kd_w: torch.Tensor,
    chunk_fn: ChunkFn,
    compute_dtype: torch.dtype,
    chunk_size: int,
    gram_grad: HeadGrad | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, CE [N], D [N])`` for ``hidden [N, d]``, the head ``weight [V, d]`` (+ ``bias [V]``) and
    per-row weights ``ce_w`` / ``kd_w`` ``[N]`` (float32, on the hidden states' device).

    ``targets [N]``: next-token ids (-100: no CE), or None. ``gram_grad``: a :class:`HeadGrad` from
    :func:`relation_term`, added to the head's gradient. ``total`` is differentiable wrt ``hidden``,
    ``weight`` and ``bias`` (one backward pass); CE and D are values.
    """
    opts = {"chunk_size": chunk_size, "compute_dtype": compute_dtype, "grad_enabled": torch.is_grad_enabled()}
    ce_w = ce_w.to(device=hidden.device, dtype=torch.float32)
    kd_w = kd_w.to(device=hidden.device, dtype=torch.float32)
    return _HeadLoss.apply(hidden, weight, bias, targets, ce_w, kd_w, gram_grad, chunk_fn, opts)


def relation_from_logits(rows: int, dim: int) -> bool:
    """Whether RDist is cheaper from the visual logits ``Z [rows, V]`` than from ``W^T W [dim, dim]``.

    The Gram path costs about ``4 V dim^2`` FLOPs a step (``W^T W`` and its gradient ``W (dG + dG^T)``)
    whatever the batch; the logits path about ``6 V rows dim`` (``Z``, and ``Z``'s gradient into the hidden
    states and into the head). With fewer visual rows than ``2/3`` of the head's width (short image
    sequences, small batches: the easy-VQA demo has 64 against 576) the logits path wins, and ``Z`` is
    then smaller than one head-sized gradient, so the fused losses' memory bound holds either way.
    """
    return 0 < 3 * rows < 2 * dim


def relation_term(
    hs: torch.Tensor,
    ws: torch.Tensor,
    bs: torch.Tensor | None,
    rel_t: torch.Tensor | None,
    weight: float,
) -> tuple[torch.Tensor, HeadGrad | None]:
    """RDist of the student's visual hidden states ``hs [B, n, d]`` against the teacher's relation
    matrices ``rel_t [B, n, n]`` (any scale: RDist is a cosine), and RDist's share of the head gradient
    (times ``weight``) when the head trains (else None).

    :func:`head_loss` adds that share to its own head gradient (one head-sized buffer a step); the returned
    RDist carries gradients to the hidden states only. Computed as ``Z Z^T`` from the visual logits
    ``Z = H W^T`` or as ``H (W^T W) H^T``, whichever is cheaper (:func:`relation_from_logits`).
    0 (attached) when there is no image.
    """
    head_trains = torch.is_grad_enabled() and (ws.requires_grad or (bs is not None and bs.requires_grad))
    want_head = head_trains and weight != 0 and rel_t is not None
    rows = hs.shape[0] * hs.shape[1]
    with torch.autocast(hs.device.type, enabled=False):
        if relation_from_logits(rows, ws.shape[1] + (bs is not None)):
            h = hs.reshape(rows, hs.shape[-1]).float()
            z = head_logits(h, ws.detach().float(), None if bs is None else bs.detach().float())
            z = z.view(hs.shape[0], hs.shape[1], -1)
            rdist = rdist_or_zero(z @ z.transpose(1, 2), rel_t)
            if not want_head:
                return rdist, None
            (d_z,) = torch.autograd.grad(rdist, z, retain_graph=True)
            return rdist, HeadGrad(rows=(h.detach(), weight * d_z.reshape(rows, -1)))
        with torch.no_grad():
            gram = head_gram(ws, bs)
        if not want_head:
            return rdist_or_zero(relation_matrix(hs, gram, bs is not None), rel_t), None
        gram.requires_grad_()
        rdist = rdist_or_zero(relation_matrix(hs, gram, bs is not None), rel_t)
        (d_gram,) = torch.autograd.grad(rdist, gram, retain_graph=True)
    return rdist, HeadGrad(gram=weight * (d_gram + d_gram.t()))


@dataclass
class HeadGrad:
    """Another term's gradient through the LM head, added by :func:`head_loss` to its own: ``gram``
    ``[d', d']`` (``d/d[W|b] = [W|b] @ gram``), or ``rows`` = (``H [N, d]``, ``dZ [N, V]``) for logits
    ``Z = H W^T + b`` (``d/dW = dZ^T H``, ``d/db = dZ.sum(0)``)."""

    gram: torch.Tensor | None = None
    rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def add_to(self, w, b, grad_w, grad_b) -> None:
        if self.gram is not None:
            add_gram_grad(w, b, self.gram, grad_w, grad_b)
        if self.rows is not None:
            h, d_z = self.rows
            if grad_w is not None:
                grad_w.addmm_(d_z.t(), h)
            if grad_b is not None:
                grad_b.add_(d_z.sum(0))


def rdist_or_zero(rel_s: torch.Tensor, rel_t: torch.Tensor | None) -> torch.Tensor:
    """``1 - cos`` of relation matrices ``[B, n, n]``, mean over images; 0 (attached) when there is none."""
    if rel_t is None or rel_s.shape[0] == 0:
        return rel_s.sum() * 0.0
    if rel_s.shape != rel_t.shape:
        raise CompatibilityError(
            f"the batch's visual relation matrices {tuple(rel_s.shape)} do not match the teacher's "
            f"{tuple(rel_t.shape)}"
        )
    with torch.autocast(rel_s.device.type, enabled=False):
        return relation_loss_from_gram(rel_s.float(), rel_t.float())


# ------------------------------------------------------------------------------------ rows and terms
@dataclass
class RowPlan:
    """The distilled rows of a ``[B, T]`` batch and what each contributes to the objective.

    ``rows`` bool ``[B, T]``; the others are over the ``N`` selected rows (row-major): ``is_resp`` /
    ``is_vis`` bool, ``targets`` next-token ids (-100: none), ``ce_w`` / ``kd_w`` float32 weights whose
    weighted sum is the objective's CE + MDist part; ``kd_resp`` bool: the response rows MDist_resp covers
    (``is_resp`` unless ``resp_keep`` narrowed it).
    """

    rows: torch.Tensor
    is_resp: torch.Tensor
    is_vis: torch.Tensor
    kd_resp: torch.Tensor
    targets: torch.Tensor
    ce_w: torch.Tensor
    kd_w: torch.Tensor
    use_resp: bool
    use_vis: bool
    with_ce: bool
    tau2: float


def plan_rows(
    labels: torch.Tensor,
    vis_mask: torch.Tensor | None,
    weights: Mapping[str, float],
    settings: DistillSettings,
    distill: bool,
    with_ce: bool = True,
    rows: torch.Tensor | None = None,
    resp_keep: torch.Tensor | None = None,
) -> RowPlan:
    """CE and MDist_resp at the response positions (hidden at t predicts label t+1), MDist_vis at the
    visual positions (unshifted), each term a mean over its rows times its weight (and tau^2 for MDist).

    ``rows``: which rows to compute (default: those some term needs); a cached teacher passes the rows
    it was built for, the response and visual positions. ``resp_keep`` (bool ``[B, T]``): MDist_resp only
    at the response positions where it is True (``loss.resp_where_teacher_right``), a mean over those.
    """
    resp = response_mask(labels)
    use_resp = distill and settings.resp
    use_vis = distill and settings.vis and vis_mask is not None
    if rows is None:
        rows = resp if (with_ce or use_resp) else torch.zeros_like(resp)
        if use_vis:
            rows = rows | vis_mask
    targets_full = torch.full_like(labels, IGNORE_INDEX)
    targets_full[:, :-1] = labels[:, 1:]
    is_resp, targets = resp[rows], targets_full[rows]
    is_vis = vis_mask[rows] if use_vis else torch.zeros_like(is_resp)
    kd_resp = is_resp if resp_keep is None else is_resp & resp_keep[rows]
    n_resp, n_kd_resp, n_vis = int(is_resp.sum()), int(kd_resp.sum()), int(is_vis.sum())
    w = {k: float(weights.get(k, 0.0)) for k in ("ce", "mdist_resp", "mdist_vis")}
    tau2 = settings.temperature**2
    ce_w = (
        is_resp.float() * (w["ce"] / max(n_resp, 1))
        if with_ce
        else torch.zeros_like(is_resp, dtype=torch.float32)
    )
    kd_w = torch.zeros_like(ce_w)
    if use_resp:
        kd_w = kd_w + kd_resp.float() * (w["mdist_resp"] * tau2 / max(n_kd_resp, 1))
    if use_vis:
        kd_w = kd_w + is_vis.float() * (w["mdist_vis"] * tau2 / max(n_vis, 1))
    return RowPlan(rows, is_resp, is_vis, kd_resp, targets, ce_w, kd_w, use_resp, use_vis, with_ce, tau2)


def collect_terms(
    plan: RowPlan,
    total: torch.Tensor,
    ce: torch.Tensor,
    d: torch.Tensor,
    rdist: torch.Tensor | None,
    w_rel: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(total + w_rel * RDist, terms)``: the unweighted, detached value of each term asked for."""
    zero = total.detach() * 0.0
    terms: dict[str, torch.Tensor] = {}
    has_resp, has_kd_resp, has_vis = (
        bool(plan.is_resp.any()),
        bool(plan.kd_resp.any()),
        bool(plan.is_vis.any()),
    )
    if plan.with_ce:
        terms["ce"] = ce[plan.is_resp].mean().detach() if has_resp else zero
    if plan.use_resp:
        terms["mdist_resp"] = (d[plan.kd_resp].mean() * plan.tau2).detach() if has_kd_resp else zero
    if plan.use_vis:
        terms["mdist_vis"] = (d[plan.is_vis].mean() * plan.tau2).detach() if has_vis else zero
    if rdist is not None:
        terms["rdist"] = rdist.detach()
        if w_rel != 0:
            total = total + w_rel * rdist
    return total, terms
