"""A checkpoint as a greedy answerer: its model with the prompt format it was trained with.

The one place that turns a checkpoint into a :class:`~mllm_kd.model.generate.Generator`, for evaluation
(``python -m mllm_kd.eval run``, the easy-VQA demo's scoring) and for the teacher's answers to unlabelled
questions (:mod:`mllm_kd.teacher.label`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mllm_kd.checkpoint.hf_llava import is_hf_llava_dir
from mllm_kd.checkpoint.native import load_checkpoint_model, resolve_checkpoint
from mllm_kd.model.generate import Generator


def training_template(ckpt: Path) -> tuple[str, str | None]:
    """The checkpoint's ``data.template`` and ``data.system_prompt`` (from its config.yaml), else defaults."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = Path(ckpt) / "config.yaml"
    if not cfg.is_file():
        return "auto", None
    try:
        data = OmegaConf.to_container(OmegaConf.load(cfg), resolve=False).get("data") or {}
    except (OmegaConfBaseException, OSError, AttributeError):
        return "auto", None
    template = data.get("template") if isinstance(data.get("template"), str) else "auto"
    system = data.get("system_prompt") if isinstance(data.get("system_prompt"), str) else None
    return template, system


def checkpoint_generator(
    ckpt: str | Path,
    device: torch.device,
    *,
    dtype: torch.dtype | None = None,
    max_new_tokens: int = 16,
    template: str | None = None,
    system_prompt: str | None = None,
) -> Generator:
    """The checkpoint's model on ``device`` (in ``dtype`` if given, evaluation mode) behind a greedy
    :class:`Generator` that prompts as its training did (``template`` / ``system_prompt`` override it)."""
    if not is_hf_llava_dir(ckpt):
        ckpt = resolve_checkpoint(ckpt, "checkpoint")  # a finished stage directory: its final/
    # FlashAttention-2 (chosen on CUDA when installed) needs half precision: a float32 model keeps SDPA
    half = dtype in (torch.bfloat16, torch.float16)
    attn_device = device if half else torch.device("cpu")
    model, tokenizer, model_cfg = load_checkpoint_model(ckpt, device=device, attn_device=attn_device)
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    model.eval()
    trained_template, trained_system = training_template(Path(ckpt))
    return Generator.from_model(
        model,
        tokenizer,
        template=template or trained_template,
        system_prompt=system_prompt if system_prompt is not None else trained_system,
        image_mean=model_cfg.vision.image_mean,
        image_std=model_cfg.vision.image_std,
        max_new_tokens=max_new_tokens,
    )
