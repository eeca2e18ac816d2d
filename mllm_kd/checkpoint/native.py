"""Self-describing, atomically written checkpoint directories.

A checkpoint directory holds everything needed to rebuild the model without its original sources::

    model.yaml            the architecture as a ModelConfig whose vision/LLM parts are full configs
    model.safetensors     all weights (vision tower, projector, LLM)
    tokenizer/            the tokenizer (with the <image> token)
    config.yaml           the resolved config of the stage that wrote it
    trainer_state.json    step, epoch, data position, losses (and, for resumable step checkpoints,
    optimizer.pt          optimizer + scheduler + RNG states)
    manifest.json         size and SHA-256 of every other file, written last (mllm_kd/checkpoint/integrity.py)

A stage directory ``run_dir/<stage>/`` holds ``metrics.jsonl``, resumable ``checkpoints/step-N/`` and,
once the stage finished, ``final/``. Every directory is written under a temporary name and renamed into
place, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_model, save_file, save_model

from mllm_kd.atomic import atomic_dir
from mllm_kd.checkpoint.hf_llava import is_hf_llava_dir, load_hf_llava
from mllm_kd.checkpoint.integrity import MANIFEST, verify_checkpoint, write_manifest
from mllm_kd.config import (
    LLMConfig,
    ModelConfig,
    ProjectorConfig,
    StageConfig,
    config_to_yaml,
    model_config_from_dict,
)
from mllm_kd.errors import CheckpointError, ConfigError
from mllm_kd.model.multimodal import MultimodalLM, build_model
from mllm_kd.model.tokenization import image_token_id, load_tokenizer
from mllm_kd.model.vision import HFVisionTower, TorchvisionVisionTower

WEIGHTS = "model.safetensors"
FINAL = "final"


def describe_model(model: MultimodalLM, cfg: ModelConfig) -> dict:
    """A ModelConfig dict that rebuilds ``model``'s architecture from configs alone (no paths)."""
    d = asdict(cfg)
    vision = d["vision"]
    if isinstance(model.vision, HFVisionTower):
        vision.update(backend="hf", config=model.vision.model.config.to_dict())
    elif isinstance(model.vision, TorchvisionVisionTower):
        vision.update(
            backend="torchvision",
            torchvision_model=model.vision.model_name,
            feature_node=model.vision.feature_node,
            image_size=model.vision.image_size,
        )
    else:
        vision.update(backend="open_clip", config=model.vision.arch_config)
    vision.update(path=None, checkpoint=None, open_clip_model=None, weights=None)
    d["projector"]["checkpoint"] = None  # the weights are in this checkpoint now
    d["llm"].update(
        path=None, gguf_file=None, keep_layers=None, checkpoint=None, config=model.llm.config.to_dict()
    )
    d["tokenizer"] = None
    return _jsonable(d)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def save_checkpoint(
    directory: Path,
    model: MultimodalLM,
    model_cfg: ModelConfig,
    tokenizer,
    stage_cfg: StageConfig | None,
    trainer_state: dict,
    extra: dict[str, Any] | None = None,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    writer: Callable[[Path], None] | None = None,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Write a checkpoint directory atomically. ``extra``: name -> object saved with ``torch.save``, or a
    callable that writes ``directory/name`` itself.

    ``state_dict`` replaces ``model``'s own weights (e.g. gathered from FSDP2 shards). ``writer`` is
    called by every process with the shared temporary directory (a sharded
    ``torch.distributed.checkpoint`` save); then only ``is_main`` writes the rest and renames.
    """
    directory = Path(directory)
    tmp = None
    if writer is not None:  # every rank writes into one temporary directory with a shared name
        tmp = directory.parent / f".{directory.name}.tmp-shared"
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        writer(tmp)
        barrier()
        if not is_main:
            return directory
    with atomic_dir(directory, tmp) as tmp:
        (tmp / "model.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(describe_model(model, model_cfg))))
        if state_dict is not None:
            save_file(_drop_tied(model, state_dict), str(tmp / WEIGHTS))
        elif writer is None:
            save_model(model, str(tmp / WEIGHTS))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        if stage_cfg is not None:
            (tmp / "config.yaml").write_text(config_to_yaml(stage_cfg))
        for name, obj in (extra or {}).items():
            if callable(obj):  # a writer (e.g. LoRA's adapter folder)
                obj(tmp / name)
            else:
                torch.save(obj, tmp / name)
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        write_manifest(tmp)  # last: sizes and hashes of everything above (dcp/ shards included)
    return directory


def _drop_tied(model: MultimodalLM, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors stores a tensor once: drop the LM head when it is tied to the input embeddings."""
    sd = {k: v.contiguous() for k, v in sd.items()}
    if getattr(model.llm.config, "tie_word_embeddings", False):
        # the same name save_model() leaves out, so that both writers give the same file
        embed = model.llm.get_input_embeddings().weight
        names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is embed]
        sd = {k: v for k, v in sd.items() if k not in names[:-1]}
    return sd


def resolve_checkpoint(path: str | Path, what: str = "checkpoint", verify: bool = False) -> Path:
    """The checkpoint directory ``path`` points at: itself, or a finished stage directory's ``final/``.

    ``verify``: check every file against the manifest (CheckpointError naming the file).
    """
    path = Path(path)
    for candidate in (path, path / FINAL):
        _recover_interrupted_swap(candidate)
        if (candidate / MANIFEST).is_file() or (
            (candidate / WEIGHTS).is_file() and (candidate / "trainer_state.json").is_file()
        ):
            if verify:
                verify_checkpoint(candidate, what)
            return candidate
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist")
    raise CheckpointError(
        f"{what} {path} holds no finished checkpoint (no {FINAL}/{WEIGHTS}); did its stage finish?"
    )


def _recover_interrupted_swap(target: Path) -> None:
    """A crash between the two renames of :func:`atomic_dir` leaves only ``.name.old-PID``: put it back."""
    if not target.exists():
        olds = sorted(target.parent.glob(f".{target.name}.old-*")) if target.parent.is_dir() else []
        if olds:
            os.replace(olds[-1], target)


def read_model_config(ckpt: Path) -> ModelConfig:
    return model_config_from_dict(OmegaConf.to_container(OmegaConf.load(ckpt / "model.yaml")))


def load_checkpoint_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    what: str = "checkpoint",
    attn_device: str | torch.device | None = None,
):
    """Rebuild the model of a checkpoint directory. Returns ``(model, tokenizer, model_cfg)``.

    ``attn_device``: the device training will run on, when it differs from ``device`` (where the weights
    are loaded): it decides ``attn_implementation="auto"`` (FlashAttention-2 on CUDA when installed).

    ``path`` is an mllm_kd checkpoint (or a finished stage directory), or a Hugging Face LLaVA directory
    (``config.json`` with ``model_type: llava``), converted at load time (:mod:`mllm_kd.checkpoint.hf_llava`).
    """
    if is_hf_llava_dir(path):
        return load_hf_llava(path, device=device, what=what)
    ckpt = resolve_checkpoint(path, what, verify=True)
    tokenizer = load_tokenizer(ckpt / "tokenizer")
    model_cfg = read_model_config(ckpt)
    model = build_model(model_cfg, image_token_id(tokenizer), len(tokenizer), device=attn_device or device)
    missing, unexpected = load_model(model, str(ckpt / WEIGHTS), strict=False)
    if unexpected or [k for k in missing if not _is_tied(model, k)]:
        raise CheckpointError(
            f"{ckpt / WEIGHTS} does not match its model.yaml: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.to(device), tokenizer, model_cfg


def _is_tied(model: MultimodalLM, key: str) -> bool:
    # safetensors stores a tied tensor once; the other name is reported missing but shares storage.
    return key.endswith("lm_head.weight") and bool(getattr(model.llm.config, "tie_word_embeddings", False))


def part_from_checkpoint(path: str | Path, part: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config (dict) and weights of one part (``vision``, ``projector``, ``llm``) of another checkpoint, e.g.
    the teacher's: what ``model.<part>.checkpoint`` names.

    ``path`` may also be a Hugging Face LLaVA directory (its ``vision_tower`` / ``multi_modal_projector``).
    """
    key = f"model.{part}.checkpoint"
    if is_hf_llava_dir(path):
        model, _, model_cfg = load_hf_llava(path, what=key)
        return _jsonable(asdict(getattr(model_cfg, part))), getattr(model, part).state_dict()
    ckpt = resolve_checkpoint(path, key, verify=True)
    part_cfg = OmegaConf.to_container(OmegaConf.load(ckpt / "model.yaml"))[part]
    prefix = f"{part}."
    with safe_open(str(ckpt / WEIGHTS), framework="pt") as f:
        weights = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118 (safe_open is not a dict)
    return part_cfg, weights


def build_from_config(cfg: ModelConfig, tokenizer, device: str | torch.device = "cpu") -> MultimodalLM:
    """Build a fresh model from a config, resolving ``vision.checkpoint`` (reuse another model's tower) and
    ``projector.checkpoint`` (start from another model's projector, e.g. the teacher's)."""
    vision_weights = None
    if cfg.vision.checkpoint:
        vision_cfg, vision_weights = part_from_checkpoint(cfg.vision.checkpoint, "vision")
        inherited = model_config_from_dict({"vision": vision_cfg}).vision
        cfg = ModelConfig(vision=inherited, projector=cfg.projector, llm=cfg.llm, tokenizer=cfg.tokenizer)
    elif not (
        cfg.vision.path or cfg.vision.config or cfg.vision.open_clip_model or cfg.vision.torchvision_model
    ):
        raise ConfigError(
            "model.vision needs one of path / config / open_clip_model / torchvision_model / checkpoint"
        )
    model = build_model(cfg, image_token_id(tokenizer), len(tokenizer), device=device)
    if vision_weights is not None:
        model.vision.load_state_dict(vision_weights)
    if cfg.projector.checkpoint:
        _load_projector(model.projector, cfg.projector)
    if cfg.llm.checkpoint:
        _load_llm(model.llm, cfg.llm)
    return model


def _load_llm(llm: torch.nn.Module, cfg: LLMConfig) -> None:
    """Copy ``cfg.checkpoint``'s LLM weights into ``llm``; with ``cfg.keep_layers`` its decoder layer
    ``keep_layers[i]`` becomes layer ``i`` (ConfigError unless every tensor is there with the same shape)."""
    where = f"model.llm.checkpoint={cfg.checkpoint}"
    _, weights = part_from_checkpoint(cfg.checkpoint, "llm")
    layers = llm.get_decoder().layers
    prefix = next(name for name, m in llm.named_modules() if m is layers) + "."
    keep = list(cfg.keep_layers) if cfg.keep_layers is not None else list(range(len(layers)))
    source = {old: new for new, old in enumerate(keep)}
    layer_key = re.compile(rf"{re.escape(prefix)}(\d+)\.(.*)")
    mapped = {}
    for key, tensor in weights.items():
        m = layer_key.fullmatch(key)
        if m is None:
            mapped[key] = tensor
        elif int(m.group(1)) in source:
            mapped[f"{prefix}{source[int(m.group(1))]}.{m.group(2)}"] = tensor
    own = llm.state_dict()
    tied = bool(getattr(llm.config, "tie_word_embeddings", False))
    if tied:  # safetensors keeps one name of a tied pair (which one varies)
        names = {m: n + ".weight" for n, m in llm.named_modules()}
        pair = [names[llm.get_input_embeddings()], names[llm.get_output_embeddings()]]
        for a, b in (pair, pair[::-1]):
            if a not in mapped and b in mapped:
                mapped[a] = mapped[b]
    wrong = _misfits(own, mapped)
    if wrong:
        raise ConfigError(
            f"{where}: its LLM does not fit this model (the same architecture needed, keep_layers indexing "
            f"its {_n_layers(weights, layer_key)} decoder layers): " + "; ".join(wrong[:3])
        )
    llm.load_state_dict({k: v for k, v in mapped.items() if k in own}, strict=False)


def _misfits(own: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> list[str]:
    """Each tensor of ``own`` that ``weights`` lacks or holds with another shape, described."""
    return [
        f"{k}: {tuple(weights[k].shape) if k in weights else 'missing'} there, {tuple(v.shape)} here"
        for k, v in own.items()
        if k not in weights or weights[k].shape != v.shape
    ]


def _n_layers(weights: dict[str, torch.Tensor], layer_key: re.Pattern) -> int:
    return len({m.group(1) for k in weights if (m := layer_key.fullmatch(k))})


def _load_projector(projector: torch.nn.Module, cfg: ProjectorConfig) -> None:
    """Copy ``cfg.checkpoint``'s projector weights into ``projector`` (ConfigError unless type and shapes match)."""
    source_cfg, weights = part_from_checkpoint(cfg.checkpoint, "projector")
    where = f"model.projector.checkpoint={cfg.checkpoint}"
    if source_cfg.get("type") != cfg.type:
        raise ConfigError(
            f"{where} holds a {source_cfg.get('type')!r} projector, this model's is {cfg.type!r}"
        )
    wrong = _misfits(projector.state_dict(), weights)
    if wrong:
        raise ConfigError(
            f"{where}: its projector does not fit this model (vision width and LLM width must match): "
            + "; ".join(wrong[:3])
        )
    projector.load_state_dict(weights)
