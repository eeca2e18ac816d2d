"""Disk space, checked before training: refuse to start a stage whose checkpoints cannot fit.

One step checkpoint is estimated from the tensors it will hold: the student's weights, the optimizer
state (AdamW: two moments per trainable parameter, in the parameter's dtype; 8-bit AdamW: one byte
each) and, under FSDP2, the sharded copy of weights and optimizer state in ``dcp/`` (split across the
ranks, each rank writing ``1/world`` of it). At the peak a stage holds ``train.keep_checkpoints`` step
checkpoints plus the one being written (pruning waits until it is complete), then the final weights.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mllm_kd.checkpoint.integrity import directory_bytes, step_checkpoints
from mllm_kd.config import StageConfig
from mllm_kd.errors import CheckpointError
from mllm_kd.runtime.distributed import DistInfo, any_rank

log = logging.getLogger(__name__)
SLACK = 1.02  # file-format headers
OVERHEAD = 16 << 20  # tokenizer (a few MB for a 150k vocabulary), configs, manifest


@dataclass(frozen=True)
class CheckpointSize:
    step: int  # bytes of one step checkpoint (all ranks together)
    final: int  # bytes of the final weights


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def estimate_checkpoint_size(
    model: nn.Module, optimizer: torch.optim.Optimizer, optimizer_name: str, sharded: bool
) -> CheckpointSize:
    """Bytes of one step checkpoint and of the final weights of ``model`` trained by ``optimizer``."""
    weights = _bytes(model.parameters()) + _bytes(model.buffers())  # parameters() lists a tied one once
    params = [p for g in optimizer.param_groups for p in g["params"]]
    per_moment = (
        (lambda p: p.numel()) if optimizer_name == "adamw8bit" else (lambda p: p.numel() * p.element_size())
    )
    optim = 2 * sum(per_moment(p) for p in params)  # AdamW's two moments per trainable parameter
    step = weights + optim + (weights if sharded else 0)  # FSDP2: model.safetensors + dcp/ (model, optim)
    return CheckpointSize(step=int(step * SLACK) + OVERHEAD, final=int(weights * SLACK) + OVERHEAD)


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB ({n} bytes)"


def check_disk_space(stage_dir: Path, size: CheckpointSize, keep: int, periodic: bool) -> None:
    """Raise CheckpointError when ``stage_dir``'s disk cannot hold the stage's checkpoints.

    ``periodic``: step checkpoints every ``train.save_every`` steps (else only one, on preemption).
    Step checkpoints already in ``stage_dir`` count as space the stage already has.
    """
    count = keep + 1 if periodic else 1
    have = sum(directory_bytes(p) for p in step_checkpoints(stage_dir))
    needed = max(0, count * size.step + size.final - have)
    free = shutil.disk_usage(stage_dir).free
    log.info(
        "checkpoints: ~%s each, final weights ~%s; %s needed, %s free in %s",
        _gb(size.step),
        _gb(size.final),
        _gb(needed),
        _gb(free),
        stage_dir,
    )
    if needed > free:
        raise CheckpointError(
            f"not enough disk space in {stage_dir}: the stage needs {_gb(needed)} but {_gb(free)} is free "
            f"({count} step checkpoints of ~{_gb(size.step)} (train.keep_checkpoints={keep}, plus the one "
            f"being written) and the final weights, ~{_gb(size.final)}, less {_gb(have)} already there); "
            "free space, lower train.keep_checkpoints, or set train.check_disk_space=false"
        )


def check_stage_space(
    cfg: StageConfig, model: nn.Module, optimizer: torch.optim.Optimizer, dist: DistInfo, sharded: bool
) -> None:
    """Every rank: CheckpointError when rank 0 finds the disk too small (off: ``train.check_disk_space``)."""
    t = cfg.train
    if not t.check_disk_space:
        return
    error = None
    if dist.is_main:
        size = estimate_checkpoint_size(model, optimizer, cfg.optim.name, sharded)
        try:
            check_disk_space(Path(cfg.output_dir), size, t.keep_checkpoints, periodic=t.save_every > 0)
        except CheckpointError as e:
            error = e
    if any_rank(dist, error is not None):
        raise error or CheckpointError(f"{cfg.stage}: not enough disk space (see rank 0's message)")
