"""The one device picker, the autocast dtype that goes with a device, and seeding."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch

from mllm_kd.errors import ConfigError

log = logging.getLogger(__name__)


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when visible, else CPU), ``cpu``, ``cuda`` (this process's GPU: ``cuda:local_rank``)
    or ``cuda:N``. A CUDA device that is not there is a :class:`ConfigError`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name}: no CUDA device is visible")
        return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (``precision=auto``) or when asked (``bf16``); none otherwise (fp32).

    ``auto`` never picks bf16 on a CPU: a whole easy-VQA stage-3 step under bf16 autocast was slower than in
    float32 on the 2-core development machine, which has bf16 matrix units (docs/performance.md).
    """
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        if device.type == "cpu":
            log.warning(
                "train.precision=bf16 on a CPU: bf16 autocast is slower than float32 for a whole training step "
                "on the CPUs measured (docs/performance.md); precision=auto uses float32 there"
            )
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
