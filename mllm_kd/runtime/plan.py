"""The run plan: how a stage runs, decided once from its resolved config and handed down.

Device, precision, the teacher's kind and placement, and the loss path are chosen here and nowhere else;
the model loaders, the trainer, the loss and the cache builder read them from the plan. The config itself
is never changed after it is resolved.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch

from mllm_kd.config import StageConfig
from mllm_kd.runtime.device import autocast_dtype, pick_device
from mllm_kd.runtime.distributed import DistInfo, dist_info_from_env

log = logging.getLogger(__name__)

TEACHER_KINDS = ("none", "model", "cache")


@dataclass(frozen=True)
class RunPlan:
    """What one process of a stage does, decided before anything is built."""

    device: torch.device  # where the student (and an online teacher) run: this process's GPU under torchrun
    amp: torch.dtype | None  # the autocast dtype (bf16), or None: float32
    teacher: str = "none"  # "none" (CE only), "model" (an online, frozen teacher) or "cache" (stored outputs)
    teacher_strategy: str = "replicate"  # "replicate" or "fsdp2" (sharded like the student), for a model
    fused: bool = True  # the loss from hidden states, chunked, wherever the heads allow it; else the logits
    checkpoint_layers: bool = False  # recompute the student's decoder layers in the backward pass
    dist: DistInfo = field(default_factory=DistInfo)

    def __post_init__(self):
        if self.teacher not in TEACHER_KINDS:
            raise ValueError(f"teacher must be one of {TEACHER_KINDS}, got {self.teacher!r}")

    @property
    def attn_device(self) -> torch.device:
        """The device that picks ``attn_implementation="auto"``: the training device when it runs in bf16
        (FlashAttention-2 needs half precision), else the CPU, which means SDPA. Weights load on the CPU."""
        return self.device if self.amp is not None else torch.device("cpu")

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype a frozen teacher's weights are held in: the autocast dtype, else float32."""
        return self.amp or torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to :attr:`amp` on :attr:`device` (a no-op context in float32)."""
        return torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=self.amp is not None)


def plan_run(cfg: StageConfig, distill: bool = True, dist: DistInfo | None = None) -> RunPlan:
    """The plan of stage ``cfg`` in this process (``distill``: whether the stage distils at all)."""
    dist = dist or dist_info_from_env()
    device = pick_device(cfg.train.device, dist.local_rank)
    teacher = "none"
    if distill and cfg.loss.distills:
        teacher = "cache" if cfg.teacher.cache else "model"
    strategy = cfg.train.teacher_strategy
    if teacher == "cache" and strategy == "fsdp2":
        log.info("train.teacher_strategy=fsdp2 does not apply to a cached teacher (no weights); replicating")
        strategy = "replicate"
    return RunPlan(
        device=device,
        amp=autocast_dtype(cfg.train.precision, device),
        teacher=teacher,
        teacher_strategy=strategy,
        fused=cfg.loss.fused,
        checkpoint_layers=checkpoint_layers(cfg.train.gradient_checkpointing, device),
        dist=dist,
    )


def checkpoint_layers(option: bool | None, device: torch.device) -> bool:
    """``train.gradient_checkpointing`` resolved: as set, or (null) on for a CPU and off for a GPU.

    On the CPUs measured the recompute costs 1.5-4% of a step and removes about a quarter of its memory
    (docs/performance.md); on a GPU its cost has not been measured, so the default there stays off (LLaVA's
    training scripts turn it on: ``train.gradient_checkpointing=true``)."""
    return option if option is not None else device.type == "cpu"
