"""LoRA and QLoRA students through peft: ``trainable.llm: lora``.

::

    python -m mllm_kd.stage3 --config configs/smoke.yaml trainable.llm=lora lora.r=8 [lora.quantize=4bit]

The LLM's linear layers named by ``lora.target_modules`` (default: every projection of the decoder blocks of
the LLM's family, :data:`FAMILY_TARGETS`) get rank-``r`` adapters, ``W x + (alpha / r) B A x``, with peft's
``inject_adapter_in_model``: the modules stay where they are, so the :class:`~mllm_kd.model.MultimodalLM`,
its forward and its LM head are unchanged. The head is never adapted, so the fused losses still take the
head's weight as a plain ``nn.Linear`` (:func:`mllm_kd.train.objective.fusable_head`) and never build the
logits; MDist and RDist reach the adapters through the final hidden states. Only the adapters train in the
LLM (the projector and vision tower follow ``trainable.projector`` / ``trainable.vision``).
``lora.quantize=4bit`` (QLoRA) first turns the LLM's other linear layers (the head excepted) into
bitsandbytes NF4 layers, the adapters then sit on the 4-bit base.

Checkpoints of a LoRA stage (step and final) hold:

* ``model.safetensors``: the model with the adapters **merged** (``W + (alpha/r) B A``, a 4-bit base
  dequantised first), under the ordinary names, so the next stage (``init_from``), ``export``, ``eval`` and
  a teacher load it as any other checkpoint;
* ``adapter/adapter_model.safetensors`` + ``adapter/adapter_config.json``: the adapters alone in peft's
  format (keys ``base_model.model.<LLM module>.lora_A.weight``), over the LLM of the stage's ``init_from``.

Resume rebuilds the base from ``init_from`` exactly as the first run did, then loads the adapters from
``adapter/`` and the other trained weights (projector, a trained vision tower) from ``model.safetensors``.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mllm_kd.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"  # peft's name of the one adapter
PEFT_PREFIX = "base_model.model."  # peft's key prefix, as PeftModel.save_pretrained writes it

_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Per LLM family (``config.model_type``): every linear layer of the attention and MLP blocks (QLoRA's finding:
# adapting all of them, not only q/v, is what matches full fine-tuning). The LM head is never adapted.
FAMILY_TARGETS: dict[str, list[str]] = {
    "llama": _PROJECTIONS,  # also SmolLM2
    "mistral": _PROJECTIONS,
    "qwen2": _PROJECTIONS,
    "qwen3": _PROJECTIONS,
    "gemma": _PROJECTIONS,
    "gemma2": _PROJECTIONS,
    "gemma3_text": _PROJECTIONS,
    "olmo2": _PROJECTIONS,
    "granite": _PROJECTIONS,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}


@dataclass
class LoraConfig:
    """LoRA adapters of the LLM, used when ``trainable.llm: lora``."""

    r: int = 16  # the adapters' rank
    alpha: float = 32.0  # scaling numerator: the update is (alpha / r) B A
    dropout: float = 0.05  # dropout on the adapters' input
    target_modules: list[str] | None = None  # module names to adapt; null: the LLM family's FAMILY_TARGETS
    quantize: str | None = None  # "4bit": QLoRA, the LLM's base linear layers in NF4 (bitsandbytes)

    def __post_init__(self) -> None:
        if self.quantize in ("none", ""):
            self.quantize = None
        if self.r < 1:
            raise ConfigError(f"lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.quantize not in (None, "4bit"):
            raise ConfigError(f"lora.quantize must be 4bit or null (QLoRA's NF4 base), got {self.quantize!r}")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError(
                "lora.target_modules is empty; give module names or null for the family default"
            )


def _require_peft():
    try:
        import peft
    except ImportError as e:
        raise ConfigError(
            "trainable.llm=lora needs the peft package: install the `lora` extra (pip install -e '.[lora]') "
            "or just peft (pip install peft)"
        ) from e
    return peft


def _linear_names(llm: nn.Module) -> list[str]:
    """The last name part of every linear leaf module of the LLM but its head (what could be adapted)."""
    from torch import nn

    head = llm.get_output_embeddings()
    names = set()
    for name, m in llm.named_modules():
        if m is head or not name:
            continue
        if isinstance(m, nn.Linear) or type(m).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def target_modules(llm: nn.Module, cfg: LoraConfig) -> list[str]:
    """``lora.target_modules``, or the family default; each must name linear layers of this LLM."""
    family = llm.config.get_text_config().model_type
    targets = cfg.target_modules
    if targets is None:
        if family not in FAMILY_TARGETS:
            raise ConfigError(
                f"lora.target_modules: no default for LLM family {family!r} (defaults exist for "
                f"{sorted(FAMILY_TARGETS)}); name the layers to adapt, e.g. lora.target_modules=[q_proj,v_proj] "
                f"(this LLM's linear layers: {_linear_names(llm)})"
            )
        targets = FAMILY_TARGETS[family]
    available = _linear_names(llm)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ConfigError(
            f"lora.target_modules: {missing} are not linear layers of this {family} LLM (its linear layers, "
            f"LM head excepted: {available})"
        )
    return list(targets)


def attach(model, cfg, device: torch.device | str = "cpu") -> int:
    """Give ``model``'s LLM LoRA adapters per ``cfg`` (a StageConfig with ``trainable.llm == "lora"``);
    QLoRA quantises the base first. Returns the number of adapted layers (0 when the stage is not LoRA)."""
    if cfg.trainable.llm != "lora":
        return 0
    peft = _require_peft()
    if cfg.train.strategy == "fsdp2":
        raise ConfigError(
            "trainable.llm=lora is not supported with train.strategy=fsdp2 (adapters are small: use "
            "train.strategy=ddp)"
        )
    targets = target_modules(model.llm, cfg.lora)
    if cfg.lora.quantize:
        from mllm_kd.teacher.quantize import quantize_llm

        n = quantize_llm(model.llm, cfg.lora.quantize, device)
        log.info("QLoRA: %d linear layers of the student's LLM in %s", n, cfg.lora.quantize)
    peft_cfg = peft.LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        bias="none",
    )
    peft.inject_adapter_in_model(peft_cfg, model.llm, adapter_name=ADAPTER_NAME)
    n = len(lora_layers(model))
    log.info("LoRA: r=%d, alpha=%g on %d layers (%s)", cfg.lora.r, cfg.lora.alpha, n, ", ".join(targets))
    return n


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{module path: peft LoRA layer}`` of ``model`` (empty without adapters or without peft)."""
    # Adapters exist only once peft was imported (importing it costs ~8 s, bitsandbytes included).
    if "peft" not in sys.modules:
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def mark_trainable(llm: nn.Module) -> None:
    """Freeze the LLM but its LoRA adapters (``apply_trainable`` for ``trainable.llm: lora``)."""
    layers = lora_layers(llm)
    if not layers:
        raise ConfigError(
            "trainable.llm=lora but the LLM has no LoRA adapters (mllm_kd.lora.attach adds them)"
        )
    llm.requires_grad_(False)
    for layer in layers.values():
        for adapters in (layer.lora_A, layer.lora_B):
            adapters.requires_grad_(True)


def _dequantized(base: nn.Module) -> torch.Tensor:
    """A base layer's weight as a float tensor (a bitsandbytes 4-bit weight dequantised)."""
    w = base.weight
    if getattr(w, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(w.data, w.quant_state).float()
    return w.detach()


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """``model``'s state dict with every adapter merged into its base weight (``W + (alpha/r) B A``) and
    4-bit layers dequantised, under the names of the model without adapters; None without adapters."""

    layers = lora_layers(model)
    if not layers:
        return None
    sd = model.state_dict()
    replaced: dict[str, nn.Module] = dict(layers)
    for name, m in model.named_modules():  # QLoRA's other 4-bit layers (not adapted)
        if type(m).__name__ == "Linear4bit" and not any(name.startswith(p + ".") for p in layers):
            replaced[name] = m
    prefixes = tuple(p + "." for p in replaced)
    out = {k: v.detach().cpu() for k, v in sd.items() if not k.startswith(prefixes)}
    for name, m in replaced.items():
        if name in layers:
            base = m.get_base_layer()
            weight = _dequantized(base).float()
            for adapter in m.active_adapters:
                weight = weight + m.get_delta_weight(adapter).float()
            dtype = base.weight.dtype if base.weight.is_floating_point() else torch_float32()
            out[f"{name}.weight"] = weight.to(dtype).cpu()
        else:
            base = m
            out[f"{name}.weight"] = _dequantized(m).float().cpu()
        if base.bias is not None:
            out[f"{name}.bias"] = base.bias.detach().cpu()
    return out


def torch_float32():
    import torch

    return torch.float32


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters in peft's format, keys relative to the LLM (``base_model.model.`` + module path)."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model.llm, adapter_name=ADAPTER_NAME)
    return {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in sd.items()}


def checkpoint_files(model, cfg) -> dict:
    """Writers of the adapter folder for :func:`mllm_kd.checkpoint.native.save_checkpoint`'s ``extra`` (none when
    the model has no adapters)."""
    if not lora_layers(model):
        return {}

    def write(path: Path) -> None:
        from safetensors.torch import save_file

        path.mkdir()
        save_file(adapter_state_dict(model), str(path / ADAPTER_WEIGHTS))
        targets = sorted({name.rsplit(".", 1)[-1] for name in lora_layers(model.llm)})
        (path / "adapter_config.json").write_text(json.dumps(adapter_config(cfg, targets), indent=2))

    return {ADAPTER_DIR: write}


def adapter_config(cfg, targets: list[str]) -> dict:
    """peft's ``adapter_config.json`` of these adapters (the base: the stage's ``init_from``'s LLM)."""
    peft = _require_peft()
    d = peft.LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=cfg.init_from,
    ).to_dict()
    return json.loads(json.dumps(d, default=lambda x: sorted(x) if isinstance(x, set) else str(x)))


def load_adapters(model: nn.Module, ckpt: str | Path) -> None:
    """Load ``ckpt/adapter/`` into ``model``'s adapters (which :func:`attach` made), every one of them.

    Copied in place, parameter by parameter: peft's ``set_peft_model_state_dict`` goes through
    ``load_state_dict``, which re-runs bitsandbytes' load hooks on a QLoRA model's 4-bit layers and breaks them.
    """
    import torch
    from safetensors.torch import load_file

    path = Path(ckpt) / ADAPTER_DIR / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint of a LoRA stage stores its adapters there")
    saved = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(path)).items()}
    own = {}  # peft's file key (adapter name left out) -> this model's adapter parameter
    for name, layer in lora_layers(model.llm).items():
        for kind in ("lora_A", "lora_B"):
            own[f"{name}.{kind}.weight"] = getattr(layer, kind)[ADAPTER_NAME].weight
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    bad = [k for k in set(own) & set(saved) if own[k].shape != saved[k].shape]
    if missing or unexpected or bad:
        raise CheckpointError(
            f"{path} does not fit this model's adapters: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"other shapes {bad[:5]} (same lora.r and lora.target_modules as the run that wrote it?)"
        )
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(saved[k])


def resume_weights(model: nn.Module, ckpt: Path, device: torch.device | str) -> None:
    """Resume a LoRA stage from its step checkpoint: the adapters from ``adapter/``, every other weight the
    file holds under the same name and shape (projector, trained vision tower; the frozen base is already
    the one of ``init_from``)."""
    from safetensors.torch import load_file

    own = model.state_dict()
    saved = load_file(str(ckpt / "model.safetensors"), device=str(device))
    import torch

    with torch.no_grad():  # in place (load_state_dict would run bitsandbytes' hooks on the 4-bit layers)
        for k, v in saved.items():
            if k in own and own[k].shape == v.shape and own[k].dtype == v.dtype:
                own[k].copy_(v)
    load_adapters(model, ckpt)
