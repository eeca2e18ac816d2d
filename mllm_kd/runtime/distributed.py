"""Multi-process training with PyTorch's own engine: torchrun + DDP or FSDP2 (``fully_shard``).

Nothing here communicates by itself: process groups, gradient all-reduce, sharding and sharded
checkpoints are ``torch.distributed``'s. This module only decides which of them to use.

    torchrun --nproc-per-node 8 -m mllm_kd.stage3 --config FILE train.strategy=fsdp2

A single process (no ``WORLD_SIZE`` in the environment, or 1) trains the plain model.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env() -> DistInfo:
    """This process's place among torchrun's (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), joining nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun set up (NCCL for CUDA tensors, gloo for CPU ones); a no-op for one process."""
    info = dist_info_from_env()
    if info.enabled and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        # NCCL moves CUDA tensors only; the small per-step flags and loss sums (any_rank, mean_over_ranks,
        # the stop request) are CPU tensors and go through gloo in the same process group
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo")
        atexit.register(leave_distributed)
    return info


def leave_distributed() -> None:
    """Destroy the process group (registered to run at exit, while the interpreter is still whole). A
    process that exits with the group alive leaves gloo's worker threads to the interpreter's teardown,
    which now and then aborts a rank ("terminate called without an active exception", SIGABRT)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_student(model: nn.Module, info: DistInfo, strategy: str, device: torch.device) -> nn.Module:
    """DDP (replicate) or FSDP2 (shard each decoder layer, then the whole model)."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if strategy == "fsdp2":
        shard(model)
        return model
    raise ValueError(f"unknown strategy {strategy!r}")


def shard(model: nn.Module) -> None:
    """FSDP2: every decoder layer is one shard group, the rest of the model another."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.llm.get_decoder().layers:
        fully_shard(layer)
    fully_shard(model)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (an FSDP2 model is sharded in place: itself)."""
    return model.module if hasattr(model, "module") and not is_sharded(model) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an optimizer step."""
    if enabled:
        yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def mean_over_ranks(info: DistInfo, values: dict[str, float]) -> dict[str, float]:
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.tolist())}


def any_rank(info: DistInfo, flag: bool) -> bool:
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t)
    return bool(t.item())


def from_main(info: DistInfo, obj):
    """Rank 0's ``obj`` on every rank (a picklable value; one broadcast)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
