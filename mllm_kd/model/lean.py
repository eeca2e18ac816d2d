"""Memory-lean decoder operators: RMSNorm and the SwiGLU MLP as autograd Functions that keep less for the backward.

Per token, eager autograd keeps for the backward of

* an RMSNorm ``w * (x * rstd)``: its input ``x``, ``rstd`` and the normalised ``x * rstd`` (``d`` floats
  besides the input); :class:`RMSNormFunction` keeps ``x`` and ``rstd`` and recomputes ``x * rstd``;
* a SwiGLU MLP ``down(silu(gate(x)) * up(x))``: ``x``, ``gate(x)``, ``silu(gate(x))``, ``up(x)`` and their
  product (4 x intermediate floats besides ``x``); :class:`SwiGLUFunction` keeps ``x``, ``gate(x)`` and
  ``up(x)`` and recomputes the pointwise rest (``silu`` and the product, for the down projection's weight
  gradient) in the backward.

No matrix product is recomputed. liger-kernel's fused RMSNorm and SwiGLU kernels save the same tensors; these
are plain PyTorch, so they run wherever the model runs (CPU, CUDA) and under ``torch.compile``.

:func:`lean_decoder_ops` applies them in place by class swap, as
:func:`mllm_kd.model.llm.checkpoint_decoder_layers` does: parameter names, state dicts and hooks are
unchanged. Only modules recognised by their structure are swapped, and only once a probe input gives the
original forward's output: an RMSNorm with a 1-D ``weight`` and a ``variance_epsilon``; an MLP whose
``gate_proj`` / ``up_proj`` / ``down_proj`` are plain bias-free ``nn.Linear`` and whose ``act_fn`` is SiLU.
Anything else (LoRA-wrapped linears, other activations or norms) keeps its forward, and the swapped
forwards check again at each call (adapters attached later, hooks on the linears) and without gradients
(evaluation, generation) run the original forward.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------------------------------- Functions
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """RMSNorm's statistics: float32 for half types and float32 (as transformers' norms), wider kept."""
    return torch.promote_types(dtype, torch.float32)


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x * rstd).to(x.dtype)``, ``rstd = 1 / sqrt(mean(x^2) + eps)`` over the last dimension.

    x: [..., d]; weight: [d]. Saves ``x`` and ``rstd`` [..., 1] (float32, or x's dtype when wider).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xc = x.to(_compute_dtype(x.dtype))
        rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xc * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd
        dx = dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy * normed.to(x.dtype)).reshape(-1, dy.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            dn = (dy * weight).to(x.dtype).to(rstd.dtype)
            # d/dx of x * rstd(x): rstd * (dn - normed * mean(dn * normed))
            dx = (rstd * (dn - normed * (dn * normed).mean(-1, keepdim=True))).to(x.dtype)
        return dx, dw, None


class SwiGLUFunction(torch.autograd.Function):
    """``down(silu(x @ w_gate^T) * (x @ w_up^T))`` with weights as inputs (FSDP2 unshards them before the call).

    x: [..., d]; w_gate, w_up: [I, d]; w_down: [d, I]. Saves x, ``gate`` and ``up`` ([..., I] each); the
    backward recomputes ``silu(gate)`` and ``silu(gate) * up`` (pointwise) from them.
    """

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down):
        gate, up = F.linear(x, w_gate), F.linear(x, w_up)
        ctx.save_for_backward(x, gate, up, w_gate, w_up, w_down)
        return F.linear(F.silu(gate) * up, w_down)

    @staticmethod
    def backward(ctx, dout):
        x, gate, up, w_gate, w_up, w_down = ctx.saved_tensors
        need_x, need_g, need_u, need_d = ctx.needs_input_grad
        sig = torch.sigmoid(gate)
        silu = gate * sig
        dout2 = dout.reshape(-1, dout.shape[-1])
        d_down = None
        if need_d:
            d_down = dout2.t() @ (silu * up).reshape(-1, up.shape[-1])
        dh = dout @ w_down  # [..., I]
        d_up = dh * silu
        del silu
        # silu'(g) = sig * (1 + g * (1 - sig))
        d_gate = dh.mul_(up).mul_(sig * (1 + gate * (1 - sig)))
        x2 = x.reshape(-1, x.shape[-1])
        dx = d_gate @ w_gate + d_up @ w_up if need_x else None
        dwg = d_gate.reshape(-1, d_gate.shape[-1]).t() @ x2 if need_g else None
        dwu = d_up.reshape(-1, d_up.shape[-1]).t() @ x2 if need_u else None
        return dx, dwg, dwu, d_down


def _cast_like_autocast(device_type: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, the inputs in autocast's dtype (what F.linear would run in); as they are otherwise."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def _no_autocast(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:class:`RMSNormFunction` (the norm computes in float32 under autocast too, as transformers' does)."""
    with _no_autocast(x.device.type):
        return RMSNormFunction.apply(x, weight, eps)


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """:class:`SwiGLUFunction`, cast as ``F.linear`` is under autocast (inputs and weights to its dtype)."""
    dev = x.device.type
    x, w_gate, w_up, w_down = _cast_like_autocast(dev, x, w_gate, w_up, w_down)
    with _no_autocast(dev):
        return SwiGLUFunction.apply(x, w_gate, w_up, w_down)


# ------------------------------------------------------------------------------------------ recognition
_SILU_TYPES: tuple[type, ...] = (nn.SiLU,)
with contextlib.suppress(ImportError):  # transformers' "silu" activation (its own class, same function)
    from transformers.activations import SiLUActivation

    _SILU_TYPES = (nn.SiLU, SiLUActivation)


def _plain_linear(m: object) -> bool:
    return type(m) is nn.Linear and m.bias is None and not m._forward_hooks and not m._forward_pre_hooks


def _is_swiglu_mlp(m: nn.Module) -> bool:
    return (
        all(_plain_linear(getattr(m, n, None)) for n in ("gate_proj", "up_proj", "down_proj"))
        and type(getattr(m, "act_fn", None)) in _SILU_TYPES
    )


def _is_rms_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (
        isinstance(w, nn.Parameter)
        and w.dim() == 1
        and isinstance(getattr(m, "variance_epsilon", None), float)
        and not list(m.children())
    )


def _probe_agrees(m: nn.Module, lean, width: int) -> bool:
    """The original forward and the lean one give the same output on a small random input."""
    p = next(m.parameters())
    if p.device.type == "meta":
        return False
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 3, width, generator=g).to(p.device, p.dtype)
    with torch.no_grad(), _no_autocast(p.device.type):
        ref = type(m).forward(m, x)
    with torch.enable_grad(), _no_autocast(p.device.type):
        got = lean(m, x.requires_grad_(True))
    tol = 1e-4 if torch.finfo(p.dtype).bits >= 32 else 2e-2  # the same operators; half types round more
    return (
        got is not None and ref.shape == got.shape and torch.allclose(got.detach(), ref, rtol=tol, atol=tol)
    )


def _uses_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _norm_lean(m: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The lean forward of a recognised RMSNorm; None where the original one should run."""
    return rms_norm(x, m.weight, m.variance_epsilon) if _uses_grad(x, m.weight) else None


def _mlp_lean(m: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The lean forward of a recognised MLP; None where the original one should run (no gradients, or
    linears wrapped or hooked since it was swapped)."""
    w = (m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)
    return swiglu(x, *w) if _uses_grad(x, *w) and _is_swiglu_mlp(m) else None


@functools.cache
def _lean(cls: type, lean) -> type:
    def forward(self, x):
        out = lean(self, x)
        return cls.forward(self, x) if out is None else out

    return type(f"Lean{cls.__name__}", (cls,), {"forward": forward, "_mllm_kd_lean": True})


def lean_decoder_ops(llm: nn.Module) -> int:
    """Swap every recognised RMSNorm and SwiGLU MLP of ``llm`` to the lean Functions, in place; idempotent.

    Returns the number of modules that run the lean forward (swapped now or before).
    """
    n = 0
    for m in llm.modules():
        if getattr(type(m), "_mllm_kd_lean", False):
            n += 1
            continue
        if _is_rms_norm(m):
            kind, width = _norm_lean, m.weight.shape[0]
        elif _is_swiglu_mlp(m):
            kind, width = _mlp_lean, m.gate_proj.in_features
        else:
            continue
        if _probe_agrees(m, kind, width):
            m.__class__ = _lean(type(m), kind)
            n += 1
    return n
