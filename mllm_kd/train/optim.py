"""The optimizer (AdamW, torch's or bitsandbytes' 8-bit; projector learning rate; no decay on biases and
norms) and the warm-up + cosine schedule.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from mllm_kd.config import OptimConfig
from mllm_kd.errors import TrainingError
from mllm_kd.model.multimodal import MultimodalLM

log = logging.getLogger(__name__)


def build_optimizer(model: MultimodalLM, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (``optim.name``: torch's, or bitsandbytes' 8-bit ``adamw8bit``); the projector has its own
    learning rate; no weight decay on biases and norms."""
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "projector" if name.startswith("projector.") else "rest"
        groups.setdefault((part, p.ndim >= 2), []).append(p)
    if not groups:
        raise TrainingError("nothing to train: every parameter is frozen (see the `trainable` config)")
    param_groups = []
    for (part, decay), params in groups.items():
        lr = cfg.projector_lr if (part == "projector" and cfg.projector_lr is not None) else cfg.lr
        param_groups.append(
            {"params": params, "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0, "name": part}
        )
    if cfg.name == "adamw8bit":
        return _adamw8bit(param_groups, cfg)
    if _fused_adamw(param_groups, cfg.fused):
        return torch.optim.AdamW(param_groups, betas=tuple(cfg.betas), fused=True)
    return torch.optim.AdamW(param_groups, betas=tuple(cfg.betas))


def _fused_adamw(param_groups: list[dict], requested: bool | None) -> bool:
    """``optim.fused``: None picks the fused kernel for a student wholly on one CUDA or CPU device that is
    not FSDP2-sharded (on a CPU torch's own default is a per-parameter loop: 5x slower over SmolLM2-135M's
    shapes, 15% of a whole easy-VQA stage-3 step; docs/performance.md)."""
    if requested is False:
        return False
    from torch.distributed.tensor import DTensor

    params = [p for g in param_groups for p in g["params"]]
    sharded = any(isinstance(p, DTensor) or isinstance(p.data, DTensor) for p in params)
    if requested is None:
        floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        types = {p.device.type for p in params}
        return (
            not sharded
            and len(types) == 1
            and types <= {"cuda", "cpu"}
            and all(p.dtype in floats for p in params)
        )
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    bad = next((p for p in params if p.dtype not in floats), None)
    if bad is not None:
        raise TrainingError(f"optim.fused=true: torch's fused AdamW does not take {bad.dtype} parameters")
    return True


def _adamw8bit(param_groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit: both moments block-wise quantised to 8 bits (tensors of >= 4096 elements)."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise TrainingError(
            "optim.name=adamw8bit needs bitsandbytes: install the `gpu` extra (pip install -e '.[gpu]') "
            "or just bitsandbytes (pip install bitsandbytes)"
        ) from e
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) or isinstance(p.data, DTensor) for g in param_groups for p in g["params"]):
        raise TrainingError(
            "optim.name=adamw8bit does not support an FSDP2-sharded student; use optim.name=adamw or "
            "train.strategy=ddp"
        )
    return bnb.optim.AdamW8bit(param_groups, lr=cfg.lr, betas=tuple(cfg.betas))


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float, min_lr_ratio: float = 0.0
):
    """Linear warm-up over ``ceil(warmup_ratio * total_steps)`` steps, then cosine to ``min_lr_ratio``."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
