"""The training engine shared by every stage: optimizer, schedule, loop, logging, checkpoints, resume.

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
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mllm_kd.checkpoint import (
    FINAL,
    WEIGHTS,
    latest_step_checkpoint,
    prune_step_checkpoints,
    save_checkpoint,
)
from mllm_kd.config import ModelConfig, OptimConfig, StageConfig, TrainConfig
from mllm_kd.data import Collator, TrainData
from mllm_kd.distributed import (
    DistInfo,
    any_rank,
    barrier,
    device_for,
    gradient_sync,
    mean_over_ranks,
    shard,
    wrap_student,
)
from mllm_kd.errors import CheckpointError, TrainingError
from mllm_kd.losses import DistillSettings, causal_lm_loss, distill_terms, response_mask
from mllm_kd.model import MultimodalLM, compile_decoder_layers

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


def pick_device(train: TrainConfig) -> torch.device:
    if train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(train.device)


def autocast_dtype(train: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (``precision=auto``), none on CPU unless asked.

    ``auto`` never picks bf16 on a CPU: without bf16 matrix units a whole training step under bf16 autocast
    was 18x slower than float32 on the 2-core development machine (docs/performance.md).
    """
    if train.precision == "bf16" or (train.precision == "auto" and device.type == "cuda"):
        if device.type == "cpu":
            log.warning(
                "train.precision=bf16 on a CPU: bf16 autocast is usually far slower than float32 there "
                "(18x for a whole step on the development machine); precision=auto uses float32"
            )
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    """``optim.fused``: None picks the fused kernel for a student wholly on CUDA that is not FSDP2-sharded."""
    if requested is False:
        return False
    from torch.distributed.tensor import DTensor

    params = [p for g in param_groups for p in g["params"]]
    sharded = any(isinstance(p, DTensor) or isinstance(p.data, DTensor) for p in params)
    if requested is None:
        return not sharded and {p.device.type for p in params} == {"cuda"}
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


class LossComputer:
    """The stage's objective on one micro-batch: CE (+ distillation terms against a frozen teacher).

    ``loss.fused`` (default): the student and teacher run without their LM heads and every term comes from
    the final hidden states and the head weights (:func:`mllm_kd.fused_losses.fused_distill_loss`), a
    ``loss.chunk_size`` of positions at a time, so no ``[B, T, V]`` logits exist. Heads the fused path
    cannot reproduce exactly (see :func:`~mllm_kd.fused_losses.fusable_head`), and ``loss.fused=false``,
    use the logits reference (:func:`~mllm_kd.losses.causal_lm_loss` + :func:`~mllm_kd.losses.distill_terms`).

    A :class:`~mllm_kd.teacher_cache.CachedTeacher` as ``teacher`` (``teacher.cache``): no teacher runs; its
    stored outputs for the batch's samples (``batch["ids"]``) are looked up and the terms are those of
    :func:`~mllm_kd.teacher_cache.cached_distill_loss` (fused) or
    :func:`~mllm_kd.teacher_cache.cached_distill_loss_reference` (``loss.fused=false``).
    """

    def __init__(self, cfg: StageConfig, teacher: nn.Module | None):
        from mllm_kd.teacher_cache import CachedTeacher, check_loss_settings

        self.loss = cfg.loss
        self.cache = teacher if isinstance(teacher, CachedTeacher) else None
        self.teacher = None if self.cache is not None else teacher
        if self.cache is not None:
            check_loss_settings(cfg)
        self.settings = DistillSettings(
            kind=cfg.loss.kind,
            temperature=cfg.loss.temperature,
            beta=cfg.loss.beta,
            alpha=cfg.loss.alpha,
            resp=cfg.loss.w_resp > 0,
            vis=cfg.loss.w_vis > 0,
            rel=cfg.loss.w_rel > 0,
        )
        self.weights = {
            "ce": cfg.loss.w_ce,
            "mdist_resp": cfg.loss.w_resp,
            "mdist_vis": cfg.loss.w_vis,
            "rdist": cfg.loss.w_rel,
        }
        if cfg.loss.fused and cfg.loss.chunk_size < 1:
            raise TrainingError(f"loss.chunk_size must be >= 1, got {cfg.loss.chunk_size}")
        self._teacher_gram: tuple[tuple, torch.Tensor] | None = None  # (weight identity, W^T W) cache
        self._fallback_logged = False

    def __call__(self, student: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the weighted total and each unweighted term (float32 scalars).

        On the fused path the terms are detached values (for logging); only the total carries gradients.
        """
        if self.loss.fused:
            # Imported here: this class is the only part of the engine that uses the fused losses.
            from mllm_kd.fused_losses import fusable_head

            head = fusable_head(student)
            t_head = None if self.teacher is None else fusable_head(self.teacher)
            if head is not None and (self.teacher is None or t_head is not None):
                if self.cache is not None:
                    return self._cached(student, batch, head)
                return self._fused(student, batch, head, t_head)
            if not self._fallback_logged:
                log.info("loss.fused: an LM head is not a plain, whole nn.Linear; using the logits reference")
                self._fallback_logged = True
        if self.cache is not None:
            return self._cached(student, batch, None)
        return self._reference(student, batch)

    def _cached(
        self, student: nn.Module, batch: dict, head: nn.Linear | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective against the cached teacher; ``head`` None: from the student's full logits."""
        from mllm_kd.teacher_cache import cached_distill_loss, cached_distill_loss_reference

        inner = getattr(student, "module", student)  # DistributedDataParallel
        ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        vis_mask = ids == inner.image_token_id
        rows = response_mask(labels) | vis_mask
        cached = self.cache.lookup(batch["ids"], ids, attn, labels, rows, ids.device)
        if head is None:
            logits = student(ids, attn, batch["pixel_values"]).logits
            return cached_distill_loss_reference(
                logits, labels, vis_mask, inner.num_visual_tokens, cached, self.weights, self.settings
            )
        hidden = student(ids, attn, batch["pixel_values"], return_logits=False).hidden
        return cached_distill_loss(
            hidden,
            head.weight,
            labels,
            vis_mask,
            inner.num_visual_tokens,
            cached,
            self.weights,
            self.settings,
            chunk_size=self.loss.chunk_size,
            head_bias=head.bias,
        )

    def _reference(self, student: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = student(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        terms = {"ce": causal_lm_loss(out.logits, batch["labels"])}
        if self.teacher is not None:
            inner = getattr(student, "module", student)  # DistributedDataParallel
            with torch.no_grad():
                t_out = self.teacher(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
            vis_mask = batch["input_ids"] == inner.image_token_id
            terms.update(
                distill_terms(
                    out.logits,
                    t_out.logits,
                    batch["labels"],
                    vis_mask,
                    inner.num_visual_tokens,
                    self.settings,
                )
            )
        total = sum(self.weights[k] * v for k, v in terms.items() if self.weights[k] != 0)
        return total, terms

    def _fused(
        self, student: nn.Module, batch: dict, head: nn.Linear, t_head: nn.Linear | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from mllm_kd.fused_losses import fused_distill_loss

        ids, attn, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
        hidden = student(ids, attn, pixels, return_logits=False).hidden
        teacher_kw = {}
        if self.teacher is not None and t_head is not None:
            inner = getattr(student, "module", student)  # DistributedDataParallel
            with torch.no_grad():
                t_hidden = self.teacher(ids, attn, pixels, return_logits=False).hidden
            teacher_kw = {
                "teacher_hidden": t_hidden,
                "teacher_head_weight": t_head.weight,
                "teacher_bias": t_head.bias,
                "vis_mask": ids == inner.image_token_id,
                "num_visual_tokens": inner.num_visual_tokens,
                "teacher_gram": self._cached_teacher_gram(t_head) if self.settings.rel else None,
            }
        return fused_distill_loss(
            hidden,
            head.weight,
            batch["labels"],
            self.weights,
            settings=self.settings,
            chunk_size=self.loss.chunk_size,
            student_bias=head.bias,
            **teacher_kw,
        )

    def _cached_teacher_gram(self, t_head: nn.Linear) -> torch.Tensor:
        """The frozen teacher's ``W^T W`` for RDist, recomputed only when its head weights change."""
        from mllm_kd.fused_losses import head_gram

        w, b = t_head.weight, t_head.bias
        key = (w.data_ptr(), w._version, w.dtype, w.device, None if b is None else (b.data_ptr(), b._version))
        if self._teacher_gram is None or self._teacher_gram[0] != key:
            with torch.no_grad():
                self._teacher_gram = (key, head_gram(w.detach(), None if b is None else b.detach()))
        return self._teacher_gram[1]


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
        student: MultimodalLM,
        teacher: MultimodalLM | None,
        data: TrainData,
        tokenizer,
        model_cfg: ModelConfig,
        on_step: StepHook | None = None,
        dist_info: DistInfo | None = None,
    ):
        self.cfg, self.student, self.teacher, self.data = cfg, student, teacher, data
        self.tokenizer, self.model_cfg, self.on_step = tokenizer, model_cfg, on_step
        self.dist = dist_info or DistInfo()
        self.out = Path(cfg.output_dir)
        t = cfg.train
        self.device = device_for(self.dist, pick_device(t))
        self.amp = autocast_dtype(t, self.device)
        self.student.to(self.device)
        self.model = wrap_student(
            student, self.dist, t.strategy, self.device
        )  # what the forward runs through
        if self.teacher is not None:
            self.teacher.to(self.device, dtype=self.amp or torch.float32).eval().requires_grad_(False)
            if self.dist.enabled and t.teacher_strategy == "fsdp2":
                shard(self.teacher)
        if t.compile:
            compile_decoder_layers(student.llm)
            if isinstance(teacher, MultimodalLM):
                compile_decoder_layers(teacher.llm)
        self.loss_fn = LossComputer(cfg, teacher)
        self.batches_per_epoch = math.ceil(data.num_samples / t.batch_size)  # per rank
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / t.grad_accum)
        total = t.max_steps if t.max_steps is not None else math.ceil(t.epochs * self.steps_per_epoch)
        self.state = TrainState(total_steps=max(1, total))
        self.optimizer = build_optimizer(student, cfg.optim)
        self.scheduler = cosine_with_warmup(
            self.optimizer, self.state.total_steps, cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio
        )

    @property
    def sharded(self) -> bool:
        return self.dist.enabled and self.cfg.train.strategy == "fsdp2"

    # ------------------------------------------------------------------------------------ resume
    def maybe_resume(self) -> bool:
        ckpt = latest_step_checkpoint(self.out)
        if ckpt is None:
            return False
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if (ckpt / "dcp").is_dir():
            self._load_sharded(ckpt)
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
            path.write_text("".join(ln + "\n" for ln in lines))

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
        extra: dict = {}
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
            collate_fn=Collator(self.tokenizer.pad_token_id),
            num_workers=self.cfg.data.num_workers,
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
        barrier(self.dist)
        self.maybe_resume()
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
        with open(self.out / "metrics.jsonl", "a") if main else contextlib.nullcontext() as metrics, bar:
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
                if (
                    t.save_every
                    and self.state.step % t.save_every == 0
                    and self.state.step < self.state.total_steps
                ):
                    self.save()
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
                with torch.autocast(
                    self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None
                ):
                    total, terms = self.loss_fn(self.model, batch)
                bad = bad or _check_finite(total, terms, self.state.step + 1)
                if any_rank(self.dist, bad is not None):
                    bad = bad or f"step {self.state.step + 1}: a loss term is not finite on another rank"
                    if cfg.loss.on_nonfinite == "raise":
                        raise TrainingError(f"{cfg.stage}: {bad}; the last good checkpoint is kept")
                    continue
                (total / n_micro).backward()
            self.state.samples += len(batch["ids"])
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
            }
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
