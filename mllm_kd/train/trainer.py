"""The training loop shared by every stage: accumulation, clipping, logging, checkpoints, exact resume.

(Over 400 lines on purpose: the loop, its checkpoints and the exact resume share one state, and a reader
follows a step from data to checkpoint in one file.)

One optimizer step = ``train.grad_accum`` micro-batches of ``train.batch_size`` samples. The data order
is a seeded permutation per epoch, and the trainer state records how many micro-batches of the current
epoch were consumed, so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mllm_kd.atomic import atomic_write_bytes
from mllm_kd.checkpoint.integrity import latest_step_checkpoint, prune_step_checkpoints
from mllm_kd.checkpoint.native import FINAL, WEIGHTS, save_checkpoint
from mllm_kd.checkpoint.space import check_stage_space
from mllm_kd.config import ModelConfig, StageConfig
from mllm_kd.data.datasets import Collator, TrainData
from mllm_kd.errors import CheckpointError, TrainingError
from mllm_kd.lora import checkpoint_files, lora_layers, merged_state_dict, resume_weights
from mllm_kd.model.lean import lean_decoder_ops
from mllm_kd.model.llm import checkpoint_decoder_layers, compile_decoder_layers
from mllm_kd.model.multimodal import MultimodalLM
from mllm_kd.runtime.distributed import (
    any_rank,
    barrier,
    from_main,
    gradient_sync,
    mean_over_ranks,
    shard,
    wrap_student,
)
from mllm_kd.runtime.plan import RunPlan
from mllm_kd.runtime.preemption import StopRequest, clear_marker, ignore_stop_signals
from mllm_kd.teacher.cache import CachedTeacher
from mllm_kd.tracking import StepMeter, Tracker, open_stage_tracker, train_metrics
from mllm_kd.train.objective import LossComputer
from mllm_kd.train.on_policy import ResponseSource
from mllm_kd.train.optim import build_optimizer, cosine_with_warmup

log = logging.getLogger(__name__)
StepHook = Callable[[int, dict], None]


@dataclass
class TrainState:
    """Where a stage is; saved as trainer_state.json."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` consumed by each rank
    epoch_samples: int = 0  # samples of `epoch` consumed by all ranks together (at the last save)
    world_size: int = 1  # processes when last saved
    batch_size: int = 0  # micro-batch size when last saved
    samples: int = 0  # samples trained on
    skipped_samples: int = 0
    skipped_steps: int = 0  # steps dropped for a non-finite loss (loss.on_nonfinite=skip)
    total_steps: int = 0
    elapsed: float = 0.0  # seconds of training so far
    last_loss: float | None = None


def _to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def _check_finite(total: torch.Tensor, terms: dict[str, torch.Tensor], step: int) -> str | None:
    """None if the loss is finite, else a message naming the step and the first non-finite term."""
    if torch.isfinite(total):
        return None
    bad = next((k for k, v in terms.items() if not torch.isfinite(v)), "total")
    return f"step {step}: loss term {bad!r} is {terms.get(bad, total).item()}"


class Trainer:
    """Runs one stage's training loop: accumulation, clipping, logging, checkpoints, exact resume.

    With several processes (torchrun) the student is wrapped in DDP or sharded with FSDP2
    (``train.strategy``); only rank 0 logs and writes, except sharded checkpoints, which every rank
    writes through ``torch.distributed.checkpoint``.
    """

    def __init__(
        self,
        cfg: StageConfig,
        plan: RunPlan,
        student: MultimodalLM,
        teacher: MultimodalLM | CachedTeacher | None,
        data: TrainData,
        tokenizer,
        model_cfg: ModelConfig,
        on_step: StepHook | None = None,
    ):
        self.cfg, self.plan, self.student, self.teacher, self.data = cfg, plan, student, teacher, data
        self.tokenizer, self.model_cfg, self.on_step = tokenizer, model_cfg, on_step
        self.dist = plan.dist
        self.device = plan.device
        self.out = Path(cfg.output_dir)
        t = cfg.train
        self.student.to(self.device)
        if t.lean_activations:  # before DDP / FSDP2 / compile, like checkpointing (mllm_kd/model/lean.py)
            log.info("lean RMSNorm / SwiGLU MLP: %d student LLM modules", lean_decoder_ops(student.llm))
        if plan.checkpoint_layers:  # before FSDP2 wraps the layers (its hooks stay outside the recompute)
            n = checkpoint_decoder_layers(student.llm)
            log.info("activation checkpointing: %d student decoder layers (train.gradient_checkpointing)", n)
        self.model = wrap_student(
            student, self.dist, t.strategy, self.device
        )  # what the forward runs through
        if plan.teacher == "model":
            teacher.to(self.device, dtype=plan.weight_dtype).eval().requires_grad_(False)
            if self.dist.enabled and plan.teacher_strategy == "fsdp2":
                shard(teacher)
        if t.compile:
            compile_decoder_layers(student.llm)
            if plan.teacher == "model":
                compile_decoder_layers(teacher.llm)
        self.loss_fn = LossComputer(cfg, teacher, plan, shared_vocab=data.shared_vocab)
        # generated responses (on-policy distillation, sequence-level KD); None: the data set's
        self.responses = ResponseSource.from_config(cfg, student, teacher, tokenizer, self.dist.rank)
        self.meter, self.tracker = StepMeter(self.device), Tracker()  # tracking: tokens/s, memory, trackers
        self.batches_per_epoch = math.ceil(data.num_samples / t.batch_size)  # per rank
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / t.grad_accum)
        total = t.max_steps if t.max_steps is not None else math.ceil(t.epochs * self.steps_per_epoch)
        self.state = TrainState(total_steps=max(1, total))
        self.optimizer = build_optimizer(student, cfg.optim)
        self.scheduler = cosine_with_warmup(
            self.optimizer, self.state.total_steps, cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio
        )
        self.stop = StopRequest()  # SIGTERM / SIGUSR1 (mllm_kd/runtime/preemption.py)

    @property
    def sharded(self) -> bool:
        return self.dist.enabled and self.cfg.train.strategy == "fsdp2"

    # ------------------------------------------------------------------------------------ resume
    def maybe_resume(self) -> bool:
        # rank 0 verifies the checkpoints (mllm_kd/checkpoint/integrity.py) and every rank loads its pick
        ckpt = from_main(self.dist, latest_step_checkpoint(self.out) if self.dist.is_main else None)
        if ckpt is None:
            return False
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if (ckpt / "dcp").is_dir():
            self._load_sharded(ckpt)
        else:
            if lora_layers(self.student):  # adapters + trained weights (mllm_kd/lora.py)
                resume_weights(self.student, ckpt, self.device)
            else:
                load_model(self.student, str(ckpt / WEIGHTS), strict=False, device=str(self.device))
            extra = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False)
            self.optimizer.load_state_dict(extra["optimizer"])
            if extra.get("rng") and state.get("world_size", 1) == self.dist.world_size:
                torch.set_rng_state(extra["rng"]["torch"])
                random.setstate(extra["rng"]["python"])
                np.random.set_state(extra["rng"]["numpy"])
        self.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
        self.state = TrainState(**state)
        self._reposition()
        if self.dist.is_main:
            self._truncate_metrics(self.state.step)
        log.info("resumed %s from %s (step %d)", self.cfg.stage, ckpt, self.state.step)
        return True

    def _reposition(self) -> None:
        """Map the saved position (samples consumed by all ranks) onto this run's ranks and batch size."""
        t, s = self.cfg.train, self.state
        per_micro = t.batch_size * self.dist.world_size
        if s.epoch_samples % per_micro:
            raise CheckpointError(
                f"{self.out}: the checkpoint stopped after {s.epoch_samples} samples of epoch {s.epoch}, which is not a "
                f"whole number of micro-batches of {t.batch_size} x {self.dist.world_size} processes; resume with "
                f"the same global batch (batch_size x processes = {s.batch_size * s.world_size})"
            )
        s.batches_in_epoch = s.epoch_samples // per_micro
        s.world_size, s.batch_size = self.dist.world_size, t.batch_size

    def _load_sharded(self, ckpt: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(ckpt / "dcp"))
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )

    def _truncate_metrics(self, step: int) -> None:
        # Lines logged after the checkpoint we resume from would otherwise appear twice.
        path = self.out / "metrics.jsonl"
        if path.exists():
            lines = [
                ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step
            ]
            atomic_write_bytes(path, "".join(ln + "\n" for ln in lines).encode())  # a kill here loses nothing

    # -------------------------------------------------------------------------------------- save
    def _full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The student's complete weights on rank 0 (gathered from the shards under FSDP2)."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            sd = get_model_state_dict(self.model, options=opts)  # a collective: every rank calls it
            return sd if self.dist.is_main else None
        return None

    def save(self, final: bool = False) -> Path:
        """Write ``final/`` or ``checkpoints/step-N/`` (atomically; rank 0 writes, every rank waits)."""
        self.state.epoch_samples = (
            self.state.batches_in_epoch * self.cfg.train.batch_size * self.dist.world_size
        )
        self.state.world_size, self.state.batch_size = self.dist.world_size, self.cfg.train.batch_size
        state = asdict(self.state)
        target = self.out / FINAL if final else self.out / "checkpoints" / f"step-{self.state.step:07d}"
        full = self._full_state_dict()
        extra: dict = checkpoint_files(self.student, self.cfg)  # LoRA: adapters in adapter/
        if full is None and self.dist.is_main:
            full = merged_state_dict(self.student)  # LoRA: model.safetensors with the adapters merged
        if not final:
            extra["scheduler.pt"] = self.scheduler.state_dict()
            if not self.sharded:
                rng = {
                    "torch": torch.get_rng_state(),
                    "python": random.getstate(),
                    "numpy": np.random.get_state(),
                }
                extra["optimizer.pt"] = {"optimizer": self.optimizer.state_dict(), "rng": rng}
        sharded_writer = self._write_dcp if (self.sharded and not final) else None
        error = None
        if self.dist.is_main or sharded_writer is not None:
            try:
                save_checkpoint(
                    target,
                    self.student,
                    self.model_cfg,
                    self.tokenizer,
                    self.cfg,
                    state,
                    extra,
                    state_dict=full,
                    writer=sharded_writer,
                    is_main=self.dist.is_main,
                    barrier=lambda: barrier(self.dist),
                )
            except OSError as e:
                error = e
        if any_rank(self.dist, error is not None):
            raise CheckpointError(
                f"{self.cfg.stage}: could not write checkpoint {target}: {error or 'failed on another rank'}; "
                "the previous checkpoint is intact"
            ) from error
        if not final and self.dist.is_main:
            prune_step_checkpoints(self.out, self.cfg.train.keep_checkpoints)
        barrier(self.dist)
        return target

    def _write_dcp(self, tmp: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))

    # -------------------------------------------------------------------------------------- loop
    def _loader(self) -> DataLoader:
        t = self.cfg.train
        ds = self.data.dataset
        start = self.state.batches_in_epoch * t.batch_size * self.dist.world_size
        if self.data.sampler is not None:
            self.data.sampler.epoch, self.data.sampler.start = self.state.epoch, start
        else:  # iterable (WebDataset): skip what this epoch already consumed
            ds.epoch, ds.skip, ds.batch_size = self.state.epoch, start, t.batch_size
        return DataLoader(
            ds,
            batch_size=t.batch_size,
            sampler=self.data.sampler,
            collate_fn=self.data.collate or Collator(self.tokenizer.pad_token_id),
            num_workers=self.cfg.data.num_workers,
            worker_init_fn=ignore_stop_signals,  # preemption is the training process's job
            pin_memory=self.device.type == "cuda",
        )

    def _micro_batches(self):
        """Yield ``(batch, n_micro_in_this_step)`` forever, epoch after epoch, tracking the position."""
        t = self.cfg.train
        while True:
            for batch in self._loader():
                first_of_step = (self.state.batches_in_epoch // t.grad_accum) * t.grad_accum
                n_micro = min(t.grad_accum, self.batches_per_epoch - first_of_step)
                self.state.batches_in_epoch += 1
                yield batch, n_micro
                if self.state.batches_in_epoch >= self.batches_per_epoch:
                    break
            self.state.epoch += 1
            self.state.batches_in_epoch = 0

    def train(self) -> Path:
        """Train to ``total_steps`` (resuming if a step checkpoint exists); returns ``output_dir/final``."""
        cfg, t = self.cfg, self.cfg.train
        main = self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            clear_marker(self.out)  # a preempted run being resumed
        barrier(self.dist)
        self.maybe_resume()
        check_stage_space(self.cfg, self.student, self.optimizer, self.dist, self.sharded)  # before any step
        self.tracker = open_stage_tracker(cfg, main, self.state.step)
        self.meter.start(self.state.elapsed)
        self.model.train()
        self.student.vision.train(cfg.trainable.vision != "frozen")
        micro = self._micro_batches()
        bar = tqdm(
            total=self.state.total_steps,
            initial=self.state.step,
            desc=cfg.stage,
            disable=not (t.progress and main),
            dynamic_ncols=True,
        )
        with (
            open(self.out / "metrics.jsonl", "a") if main else contextlib.nullcontext() as metrics,
            bar,
            self.tracker,
            self.stop.installed(),
        ):
            while self.state.step < self.state.total_steps:
                started = time.perf_counter()
                sums, bad = self._accumulate(micro)
                grad_norm = self._optimizer_step(skip=bad is not None)
                self.state.step += 1
                self.state.elapsed += time.perf_counter() - started
                sums = mean_over_ranks(self.dist, sums)
                if bad is not None:
                    self.state.skipped_steps += 1
                    log.warning("%s: %s; step skipped (%d so far)", cfg.stage, bad, self.state.skipped_steps)
                else:
                    self.state.last_loss = sums.get("loss")
                if main:
                    self._log(metrics, bar, sums, grad_norm)
                if self.on_step is not None:
                    self.on_step(self.state.step, sums)
                if self.state.step < self.state.total_steps:
                    stop = self.stop.agreed(self.dist)  # every rank stops after the same step
                    if stop or (t.save_every and self.state.step % t.save_every == 0):
                        ckpt = self.save()
                    if stop:
                        raise self.stop.stopped(cfg.stage, self.out, self.state.step, ckpt, main)
        final = self.save(final=True)
        if main:
            prune_step_checkpoints(self.out, 0)
        barrier(self.dist)
        return final

    def _accumulate(self, micro) -> tuple[dict[str, float], str | None]:
        """Forward + backward over one optimizer step's micro-batches (gradients all-reduced once).

        Returns the step's mean loss terms and, if a loss was not finite, a message naming the term.
        """
        cfg = self.cfg
        sums: dict[str, float] = {}
        bad: str | None = None
        n_micro, k = 1, 0
        while k < n_micro:
            batch, n_micro = next(micro)
            k += 1
            self._count_skipped(batch["skipped"])
            if "input_ids" not in batch:
                continue
            batch = _to_device(batch, self.device)
            with gradient_sync(self.model, enabled=k == n_micro):
                with self.plan.autocast():
                    if self.responses is not None:
                        batch = self.responses(batch, self.state.step + 1, k)
                    total, terms = self.loss_fn(self.model, batch)
                bad = bad or _check_finite(total, terms, self.state.step + 1)
                if any_rank(self.dist, bad is not None):
                    bad = bad or f"step {self.state.step + 1}: a loss term is not finite on another rank"
                    if cfg.loss.on_nonfinite == "raise":
                        raise TrainingError(f"{cfg.stage}: {bad}; the last good checkpoint is kept")
                    continue
                (total / n_micro).backward()
            self.state.samples += len(batch["ids"])
            self.meter.add(batch["attention_mask"])
            for name, v in {"loss": total, **terms}.items():
                sums[name] = sums.get(name, 0.0) + float(v.detach()) / n_micro
        return sums, bad

    def _count_skipped(self, n: int) -> None:
        self.state.skipped_samples += n
        seen = self.state.samples + self.state.skipped_samples
        limit = self.cfg.data.max_skip_fraction
        if n and self.state.skipped_samples > 1 and self.state.skipped_samples / seen > limit:
            raise TrainingError(
                f"{self.state.skipped_samples} of {seen} samples skipped, more than data.max_skip_fraction={limit}"
            )

    def _optimizer_step(self, skip: bool) -> float | None:
        grad_norm = None
        if not skip:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if self.cfg.optim.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.max_grad_norm)
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm

    def _log(self, metrics, bar, sums: dict[str, float], grad_norm: float | None) -> None:
        s = self.state
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in sums.items()}, refresh=False)
        if s.step % self.cfg.train.log_every == 0 or s.step == s.total_steps:
            lrs = {f"lr_{g['name']}": g["lr"] for g in self.optimizer.param_groups}
            row = {
                "step": s.step,
                "epoch": s.epoch,
                "samples": s.samples * self.dist.world_size,
                **sums,
                "grad_norm": grad_norm,
                **lrs,
                "elapsed": round(s.elapsed, 3),
                **self.meter.read(s.elapsed, self.dist.world_size),
            }
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            self.tracker.log(train_metrics(row), s.step)
