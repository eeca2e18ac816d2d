"""The causal LLM: built from a local path or a config through transformers' Auto classes; attention backend."""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mllm_kd.config import LLMConfig
from mllm_kd.errors import ConfigError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ LLM
def attention_implementation(requested: str, device: torch.device | str) -> str:
    """FlashAttention-2 on CUDA when the `flash-attn` package is installed, PyTorch SDPA otherwise."""
    if requested != "auto":
        return requested
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build_llm(cfg: LLMConfig, device: torch.device | str = "cpu", vocab_size: int | None = None) -> nn.Module:
    """Any ``AutoModelForCausalLM``: from a local directory (or GGUF file) or random from a config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    attn = attention_implementation(cfg.attn_implementation, device)
    if cfg.path:
        kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        llm = AutoModelForCausalLM.from_pretrained(
            cfg.path, attn_implementation=attn, dtype=torch.float32, **kwargs
        )
    elif cfg.config:
        kwargs = dict(cfg.config)
        if "model_type" not in kwargs:
            raise ConfigError("model.llm.config needs a model_type (e.g. qwen2, llama)")
        if vocab_size is not None:
            kwargs.setdefault("vocab_size", vocab_size)
        hf_cfg = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        llm = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn)
    else:
        raise ConfigError("model.llm: give `path` (a local model directory) or `config` (random init)")
    if cfg.keep_layers is not None:
        keep_decoder_layers(llm, cfg.keep_layers)
    log.info("LLM %s with %s attention", type(llm).__name__, attn)
    return llm


def keep_decoder_layers(llm: nn.Module, keep: list[int]) -> None:
    """Keep only the decoder layers ``keep`` (in that order): a smaller student derived from a big LLM."""
    layers = llm.get_decoder().layers
    if not keep or any(not 0 <= i < len(layers) for i in keep):
        raise ConfigError(
            f"model.llm.keep_layers={keep} must be indices into the {len(layers)} decoder layers"
        )
    new = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(new):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx  # the KV cache is indexed by layer position
    llm.get_decoder().layers = new
    llm.config.num_hidden_layers = len(new)
    if getattr(llm.config, "layer_types", None) is not None:
        llm.config.layer_types = [llm.config.layer_types[i] for i in keep]


def checkpoint_decoder_layers(llm: nn.Module) -> int:
    """Activation checkpointing of each decoder layer (``torch.utils.checkpoint``, non-reentrant), in place.

    While training with gradients, a layer keeps only its inputs and recomputes its activations in the
    backward pass. Each layer becomes an instance of a subclass whose ``forward`` checkpoints the original
    one (what FSDP2 does for its hooks): parameter names, state dicts and module hooks (FSDP2's, applied
    later) are unchanged and stay outside the recomputed region; ``torch.compile`` of the layer traces the
    checkpoint. Idempotent. Returns the number of layers checkpointed.
    """
    layers = llm.get_decoder().layers
    for layer in layers:
        if not getattr(type(layer), "_mllm_kd_checkpointed", False):
            layer.__class__ = _checkpointed(type(layer))
    return len(layers)


@functools.cache
def _checkpointed(cls: type) -> type:
    def forward(self, *args, **kwargs):
        inner = super(sub, self).forward
        if self.training and torch.is_grad_enabled():
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)

    sub = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "_mllm_kd_checkpointed": True})
    return sub


def compile_decoder_layers(llm: nn.Module) -> int:
    """``torch.compile`` each decoder layer in place (one graph, reused by every layer: torchtune's way).

    The modules stay what they were (``nn.Module.compile``), so state dicts, FSDP2 shards and the fused
    losses' view of the LM head are unchanged. Returns the number of layers compiled.
    """
    layers = llm.get_decoder().layers
    for layer in layers:
        layer.compile()
    return len(layers)
