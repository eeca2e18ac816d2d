"""One gradient buffer for an input embedding tied to the LM head (SmolLM2, Qwen2.5-0.5B, Gemma, ...).

Plain autograd gives a tied ``[V, d]`` weight two gradients, the head's and ``nn.Embedding``'s dense
backward, and sums them into a third tensor before the parameter's ``.grad`` takes it: three ``V x d``
float32 buffers at the end of the backward pass (108 MiB each at SmolLM2's V = 49,152, d = 576).
:func:`tied_lookup` does the lookup and hands back the weight to use as the head's, as outputs of one
autograd node; its backward receives the head's gradient and adds the looked-up rows' gradients into it
in place (``index_add_``), so the weight gets one buffer. Same sum, summed in another order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _TiedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, ids, padding_idx):
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.shape = padding_idx, weight.shape
        return F.embedding(ids, weight, padding_idx), weight.view_as(weight)

    @staticmethod
    def backward(ctx, g_embeds, g_head):
        (ids,) = ctx.saved_tensors
        if g_embeds is None:
            return g_head, None, None
        idx, rows = ids.reshape(-1), g_embeds.reshape(-1, ctx.shape[1])
        if ctx.padding_idx is not None:  # nn.Embedding gives the padding row no gradient
            rows = rows.masked_fill((idx == ctx.padding_idx).unsqueeze(1), 0)
        if g_head is None:
            g_head = rows.new_zeros(ctx.shape)
        elif 0 in g_head.stride():  # an expanded gradient (the weight summed somewhere) cannot be written to
            g_head = g_head.clone()
        return g_head.index_add_(0, idx, rows.to(g_head.dtype)), None, None


def tied_embedding(llm: nn.Module) -> nn.Embedding | None:
    """The LLM's input embedding when it is a plain ``nn.Embedding`` whose trained weight is the plain
    ``nn.Linear`` head's (no hooks, no max_norm / frequency scaling / sparse gradients), else None."""
    embed, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    if type(embed) is not nn.Embedding or type(head) is not nn.Linear or embed.weight is not head.weight:
        return None
    if embed.max_norm is not None or embed.scale_grad_by_freq or embed.sparse:
        return None
    hooked = (
        embed._forward_hooks or embed._forward_pre_hooks or head._forward_hooks or head._forward_pre_hooks
    )
    return embed if embed.weight.requires_grad and not hooked else None


def tied_lookup(embed: nn.Embedding, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embed(ids), head_weight)``: ``head_weight`` aliases ``embed.weight``; use it as the LM head's weight
    (``F.linear`` or the fused losses, whose weight gradients are fresh tensors the backward may add into)
    so that both gradients meet in one buffer."""
    return _TiedLookup.apply(embed.weight, ids, embed.padding_idx)
