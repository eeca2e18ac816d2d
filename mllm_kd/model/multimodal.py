"""Model assembly: vision tower -> projector -> causal LLM.

Built by explicit builder functions keyed on config fields (`vision.backend`, `projector.type`,
`llm.config.model_type` through transformers' own Auto classes), never on substrings of names or paths.

Sequence layout: the data pipeline expands every ``<image>`` placeholder into ``num_visual_tokens``
copies of the ``<image>`` token id. :meth:`MultimodalLM.embed` replaces the embeddings at those
positions with the projected image features, image after image in row-major order, so each sample
keeps its own visual span and batches of any size work with padding.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mllm_kd.config import ModelConfig, ProjectorConfig, TrainableConfig
from mllm_kd.errors import ConfigError
from mllm_kd.model.llm import build_llm
from mllm_kd.model.tied import tied_embedding, tied_lookup
from mllm_kd.model.vision import build_vision_tower

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ projector
def build_projector(cfg: ProjectorConfig, vision_dim: int, llm_dim: int) -> nn.Module:
    """``linear`` or ``mlp{N}x_gelu`` (LLaVA's naming): ``[..., vision_dim]`` -> ``[..., llm_dim]``."""
    if cfg.type == "linear":
        return nn.Linear(vision_dim, llm_dim)
    match = re.fullmatch(r"mlp(\d+)x_gelu", cfg.type)
    if not match:
        raise ConfigError(f"unknown projector type {cfg.type!r}")
    layers: list[nn.Module] = [nn.Linear(vision_dim, llm_dim)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(llm_dim, llm_dim)]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------- the MLLM
@dataclass
class MLLMOutput:
    logits: torch.Tensor | None  # [B, T, V] (None when not asked for)
    hidden: torch.Tensor  # [B, T, d_llm] final hidden states (after the final norm)
    # the LM head's weight for losses computed from ``hidden``: with a tied, trained embedding an alias
    # through which the head's and the embedding's gradients meet in one buffer (mllm_kd/model/tied.py);
    # None: the head module's own
    head_weight: torch.Tensor | None = None
    visual: torch.Tensor | None = (
        None  # [N_images, num_visual_tokens, d_llm] the projected images (None: none)
    )
    # with return_layers: the decoder's hidden states by layer, transformers' ``output_hidden_states`` (index i
    # < n_layers the input of layer i, index n_layers the final normed output, ``hidden`` itself)
    layers: tuple[torch.Tensor, ...] | None = None


class MultimodalLM(nn.Module):
    """Vision tower -> projector -> LLM, with the ``<image>`` token id used for visual positions."""

    def __init__(self, vision: nn.Module, projector: nn.Module, llm: nn.Module, image_token_id: int):
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.image_token_id = image_token_id
        self.num_visual_tokens = self._count_visual_tokens()

    @torch.no_grad()
    def _count_visual_tokens(self) -> int:
        size = self.vision.image_size
        param = next(self.vision.parameters())
        feats = self.vision(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype))
        return int(feats.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.llm.get_output_embeddings().weight.shape[0])

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> ``[N, num_visual_tokens, d_llm]``."""
        param = next(self.vision.parameters())
        feats = self.vision(pixel_values.to(device=param.device, dtype=param.dtype))
        return self.projector(feats.to(next(self.projector.parameters()).dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings ``[B, T, d]`` with the image features written at the ``<image>`` positions."""
        return self._embed(input_ids, pixel_values, None)[0]

    def _embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, tied: nn.Embedding | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(embeds, head_weight, visual)``: ``visual`` the projected images (None without any);
        ``tied``: look up through :func:`~mllm_kd.model.tied.tied_lookup`."""
        vis_mask = input_ids == self.image_token_id
        lookup = input_ids.masked_fill(vis_mask, 0)
        head_weight = None
        if tied is None:
            embeds = self.llm.get_input_embeddings()(lookup)
        else:
            embeds, head_weight = tied_lookup(tied, lookup)
        n_vis = int(vis_mask.sum())
        if n_vis == 0:
            if pixel_values is not None and pixel_values.shape[0] > 0:
                raise ValueError(f"{pixel_values.shape[0]} images given but the batch has no <image> tokens")
            return embeds, head_weight, None
        if pixel_values is None:
            raise ValueError("the batch has <image> tokens but no pixel_values")
        feats = self.encode_images(pixel_values)
        if feats.shape[0] * feats.shape[1] != n_vis:
            raise ValueError(
                f"{n_vis} <image> token positions but {feats.shape[0]} images x {feats.shape[1]} visual tokens"
            )
        embeds = embeds.clone()
        embeds[vis_mask] = feats.reshape(-1, feats.shape[-1]).to(embeds.dtype)
        return embeds, head_weight, feats

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        return_logits: bool = True,
        return_layers: bool = False,
    ) -> MLLMOutput:
        """Run the LLM on text + images.

        Args:
            input_ids: ``[B, T]`` with ``num_visual_tokens`` ``<image>`` ids per image.
            attention_mask: ``[B, T]`` (1 = real token).
            pixel_values: ``[N_images, 3, H, W]`` in the order the images appear in the batch.
            return_logits: False skips the LM head (fused losses work from ``hidden``).
            return_layers: also return every layer's hidden states (``MLLMOutput.layers``).
        """
        tied = tied_embedding(self.llm) if torch.is_grad_enabled() else None
        embeds, head_weight, visual = self._embed(input_ids, pixel_values, tied)
        decoder = self.llm.get_decoder()
        dec = decoder(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            use_cache=False,
            output_hidden_states=return_layers,
        )
        hidden = dec.last_hidden_state
        head = self.llm.get_output_embeddings()
        logits = None
        if return_logits:
            logits = head(hidden) if head_weight is None else F.linear(hidden, head_weight, head.bias)
        layers = tuple(dec.hidden_states) if return_layers else None
        return MLLMOutput(logits=logits, hidden=hidden, head_weight=head_weight, visual=visual, layers=layers)


def build_model(
    cfg: ModelConfig, image_token_id: int, vocab_size: int, device: str | torch.device = "cpu"
) -> MultimodalLM:
    """Build a :class:`MultimodalLM` from its config (weights from paths, or random from configs).

    ``cfg.vision.checkpoint`` (a vision tower taken from another mllm_kd checkpoint) is resolved by
    :func:`mllm_kd.checkpoint.native.build_from_config`, which calls this.
    """
    vision = build_vision_tower(cfg.vision)
    llm = build_llm(cfg.llm, device=device, vocab_size=vocab_size)
    if llm.get_input_embeddings().weight.shape[0] < vocab_size:
        llm.resize_token_embeddings(vocab_size)
    vision_dim = _vision_width(vision)
    projector = build_projector(cfg.projector, vision_dim, llm.config.get_text_config().hidden_size)
    return MultimodalLM(vision, projector, llm, image_token_id)


@torch.no_grad()
def _vision_width(vision: nn.Module) -> int:
    size = vision.image_size
    return int(vision(torch.zeros(1, 3, size, size)).shape[-1])


def apply_trainable(model: MultimodalLM, trainable: TrainableConfig) -> dict[str, int]:
    """The one place that decides which parameters train. Returns trainable parameter counts per part.

    A trained vision tower keeps frozen what cannot reach the selected features (the blocks after
    ``feature_layer``, a final norm or pooling head): such parameters would get no gradient, which
    DDP treats as an error.
    """
    counts = {}
    for part in ("vision", "projector", "llm"):
        module: nn.Module = getattr(model, part)
        mode = getattr(trainable, part)
        for p in module.parameters():
            p.requires_grad_(mode == "full")
        if part == "llm" and mode == "lora":
            from mllm_kd.lora import mark_trainable  # the LoRA adapters only (mllm_kd/lora.py)

            mark_trainable(module)
        if part == "vision" and mode == "full":
            _freeze_unreachable(module)
        counts[part] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return counts


def _freeze_unreachable(vision: nn.Module) -> None:
    size = vision.image_size
    param = next(vision.parameters())
    vision.zero_grad(set_to_none=True)
    vision(
        torch.randn(1, 3, size, size, device=param.device, dtype=param.dtype)
    ).float().square().sum().backward()
    for p in vision.parameters():
        if p.grad is None:
            p.requires_grad_(False)
        p.grad = None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
