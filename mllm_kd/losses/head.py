"""The LM head as the chunked losses use it: logits of a chunk, gradients pushed back through the head,
``W^T W`` and the relation matrices ``H (W^T W) H^T`` of RDist.

All float32 accumulation; matmuls in the compute dtype (autocast's when on, as ``lm_head`` would run).
"""

from __future__ import annotations

import torch

GRAM_ROWS = 16384  # vocabulary rows per step when W^T W (or a gradient through it) needs a cast or a bias


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when on (as for ``lm_head``), else the inputs'."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def head_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``h [c, d] @ w[V, d]^T (+ b)`` as float32 ``[c, V]`` (the matmul in the inputs' dtype)."""
    z = torch.mm(h, w.t()) if b is None else torch.addmm(b, h, w.t())
    return z.float()


def all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every element of the (small) tensors is finite: one host synchronisation for all of them."""
    return bool(torch.isfinite(torch.cat([t.reshape(-1) for t in tensors])).all())


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
            for v0 in range(0, grad.shape[1], GRAM_ROWS):
                grad_w[v0 : v0 + GRAM_ROWS].add_(torch.mm(grad[:, v0 : v0 + GRAM_ROWS].t(), hs))


# ------------------------------------------------------------------------------------ W^T W and RDist
def _augment(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    x = w.float()
    return x if b is None else torch.cat([x, b.float().unsqueeze(1)], dim=1)


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
                for v0 in range(0, w.shape[0], GRAM_ROWS):
                    x = _augment(w[v0 : v0 + GRAM_ROWS], None if b is None else b[v0 : v0 + GRAM_ROWS])
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
            for v0 in range(0, w.shape[0], GRAM_ROWS):
                v1 = min(w.shape[0], v0 + GRAM_ROWS)
                y = _augment(w[v0:v1], None if b is None else b[v0:v1]) @ s
                if grad_w is not None:
                    grad_w[v0:v1] = y[:, :d]
                if grad_b is not None:
                    grad_b[v0:v1] = y[:, d]
        return grad_w, grad_b


def head_gram(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``W^T W`` (``[d, d]``, float32), or ``[W | b]^T [W | b]`` (``[d+1, d+1]``) with a bias.

    Differentiable wrt ``weight`` and ``bias``; never allocates more than one weight-sized tensor.
    """
    return _HeadGram.apply(weight, bias)


def add_gram_grad(
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
    for v0 in range(0, w.shape[0], GRAM_ROWS):
        v1 = min(w.shape[0], v0 + GRAM_ROWS)
        y = _augment(w[v0:v1], None if b is None else b[v0:v1]) @ s
        if grad_w is not None:
            grad_w[v0:v1] += y[:, :d]
        if grad_b is not None:
            grad_b[v0:v1] += y[:, d]


def relation_matrix(h: torch.Tensor, gram: torch.Tensor, bias: bool) -> torch.Tensor:
    """``Z Z^T = H G H^T`` (float32 ``[B, n, n]``) from hidden states ``[B, n, d]`` and ``G = head_gram``.

    With a bias, ``Z = [H 1] [W b]^T``: ``H`` gets a column of ones to match the ``[d+1, d+1]`` Gram.
    """
    h = h.float()
    if bias:
        h = torch.cat([h, h.new_ones(*h.shape[:-1], 1)], dim=-1)
    if h.shape[-1] != gram.shape[0]:
        raise ValueError(f"hidden states {tuple(h.shape)} do not match the head's Gram {tuple(gram.shape)}")
    return (h @ gram) @ h.transpose(1, 2)
