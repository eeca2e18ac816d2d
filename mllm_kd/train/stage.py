"""What every stage does: preflight -> set up student (and teacher) -> train -> save.

The stage modules in ``stages/`` say what differs (which parts train, which losses, where the model
starts); this function is the same setup -> train -> save for all of them. Every check that can fail
on bad input runs before anything is written.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from mllm_kd.checkpoint.hf_llava import is_hf_llava_dir
from mllm_kd.checkpoint.integrity import verify_checkpoint
from mllm_kd.checkpoint.native import build_from_config, load_checkpoint_model, resolve_checkpoint
from mllm_kd.config import ModelConfig, StageConfig
from mllm_kd.data.cross_tokens import with_teacher_encoding
from mllm_kd.data.datasets import build_train_data
from mllm_kd.data.encoding import ImageProcessor
from mllm_kd.data.records import load_llava_json
from mllm_kd.errors import CheckpointError, ConfigError
from mllm_kd.lora import attach as attach_lora
from mllm_kd.model.multimodal import MultimodalLM, apply_trainable, count_parameters
from mllm_kd.model.tokenization import load_tokenizer
from mllm_kd.recipe import check_combinations
from mllm_kd.runtime.device import seed_everything
from mllm_kd.runtime.distributed import barrier, init_distributed
from mllm_kd.runtime.plan import RunPlan, plan_run
from mllm_kd.teacher.cache import CachedTeacher
from mllm_kd.teacher.load import load_teacher, load_teacher_preprocessing
from mllm_kd.tracking import check_available
from mllm_kd.train.trainer import StepHook, Trainer

log = logging.getLogger(__name__)


def stage_finished(cfg: StageConfig) -> Path | None:
    try:
        return resolve_checkpoint(cfg.output_dir)
    except CheckpointError:
        return None


def init_model(
    cfg: StageConfig, model_cfg: ModelConfig, plan: RunPlan | None = None
) -> tuple[MultimodalLM, object, ModelConfig]:
    """The model a stage starts from: the previous stage's result (``init_from``) or built fresh."""
    attn_device = (plan or plan_run(cfg)).attn_device
    if cfg.init_from:
        return load_checkpoint_model(
            cfg.init_from,
            what=f"{cfg.stage}: the previous stage's directory (init_from)",
            attn_device=attn_device,
        )
    tok_path = model_cfg.tokenizer or model_cfg.llm.path
    if not tok_path:
        raise ConfigError(f"{cfg.stage}: set model.tokenizer (a tokenizer directory) or model.llm.path")
    tokenizer = load_tokenizer(tok_path, model_cfg.llm.gguf_file if not model_cfg.tokenizer else None)
    return build_from_config(model_cfg, tokenizer, device=attn_device), tokenizer, model_cfg


def _check_checkpoint(path: str, what: str) -> None:
    """``path`` is what :func:`load_checkpoint_model` reads: a Hugging Face LLaVA directory or a finished
    mllm_kd checkpoint (else a CheckpointError naming ``what``)."""
    if not is_hf_llava_dir(path):
        resolve_checkpoint(path, what=what)


def check_inputs(cfg: StageConfig, model_cfg: ModelConfig, plan: RunPlan) -> list[dict] | None:
    """What a stage reads, checked before any model is built: the checkpoints and directories it names
    exist, and a LLaVA JSON data set is valid (its records are returned; None for WebDataset shards)."""
    if cfg.init_from:
        _check_checkpoint(cfg.init_from, f"{cfg.stage}: the previous stage's directory (init_from)")
    else:
        for part in ("vision", "projector", "llm"):
            if getattr(model_cfg, part).checkpoint:
                _check_checkpoint(getattr(model_cfg, part).checkpoint, f"model.{part}.checkpoint")
        tok = model_cfg.tokenizer or model_cfg.llm.path
        if tok and not Path(tok).exists():
            key = "model.tokenizer" if model_cfg.tokenizer else "model.llm.path"
            raise ConfigError(f"{key}: {tok} does not exist")
    if plan.teacher == "model":
        _check_checkpoint(cfg.teacher.checkpoint, "teacher.checkpoint")
    elif plan.teacher == "cache" and not Path(cfg.teacher.cache).is_dir():
        raise ConfigError(
            f"teacher.cache: {cfg.teacher.cache} does not exist (python -m mllm_kd.cache_teacher)"
        )
    if cfg.data.image_folder and not Path(cfg.data.image_folder).is_dir():
        raise ConfigError(f"data.image_folder: {cfg.data.image_folder} is not a directory")
    return load_llava_json(cfg.data) if cfg.data.format == "llava_json" else None


def _teacher_words(stage: str, teacher) -> str:
    if teacher is None:
        return "trained from its labels" if stage.startswith("teacher") else "no teacher"
    if isinstance(teacher, CachedTeacher):  # stored outputs, no weights
        return f"distilling from the teacher cache {teacher.directory}"
    return f"distilling from a teacher of {count_parameters(teacher) / 1e6:.2f}M parameters"


def run_stage(
    cfg: StageConfig, model_cfg: ModelConfig, distill: bool, on_step: StepHook | None = None
) -> Path:
    """Set up and train one stage; returns the finished checkpoint directory (``output_dir/final``)."""
    done = stage_finished(cfg)
    if done is not None and not cfg.overwrite:
        try:
            verify_checkpoint(done, f"{cfg.stage}: the finished checkpoint")
        except CheckpointError as e:
            raise CheckpointError(f"{e}; restore it, or redo the stage with overwrite=true") from e
        log.info("%s already finished at %s; skipping (overwrite=true redoes it)", cfg.stage, done)
        return done
    check_combinations(cfg, distill)  # as at config load, for a config built in code
    check_available(cfg.log)  # a requested tracker's package is installed (mllm_kd/tracking.py)
    seed_everything(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    plan = plan_run(cfg, distill)
    records = check_inputs(cfg, model_cfg, plan)
    dist_info = init_distributed(plan.device.type)

    student, tokenizer, model_cfg = init_model(cfg, model_cfg, plan)
    teacher = None if plan.teacher == "none" else load_teacher(cfg, student, tokenizer, model_cfg, plan)
    images = ImageProcessor(
        student.vision.image_size, list(model_cfg.vision.image_mean), list(model_cfg.vision.image_std)
    )
    data = build_train_data(
        cfg.data,
        tokenizer,
        student.num_visual_tokens,
        student.image_token_id,
        images,
        seed=cfg.train.seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        batch_size=cfg.train.batch_size,
        records=records,
    )
    if cfg.loss.cross_tokenizer and plan.teacher == "model":  # the teacher reads its own encoding
        t_tok, t_images = load_teacher_preprocessing(cfg, teacher)
        data = with_teacher_encoding(data, cfg.data, tokenizer, teacher, t_tok, t_images, student.vocab_size)
    elif cfg.loss.cross_tokenizer and plan.teacher == "cache":  # less what the teacher's encoding skipped
        data = teacher.without_skipped(data)
    attach_lora(student, cfg, plan.device)  # trainable.llm=lora: adapters (mllm_kd/lora.py)
    trainable = apply_trainable(student, cfg.trainable)
    role = (
        "teacher" if cfg.stage.startswith("teacher") else "student"
    )  # teacher_pt / teacher_sft train the teacher
    log.info(
        "%s: %d samples, %s %.2fM parameters (trainable: %s), %s, device %s",
        cfg.stage,
        data.num_samples,
        role,
        count_parameters(student) / 1e6,
        ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in trainable.items()),
        _teacher_words(cfg.stage, teacher),
        plan.device,
    )
    if done is not None and dist_info.is_main:  # overwrite=true and every check passed: only now remove it
        shutil.rmtree(done)
    barrier(dist_info)
    trainer = Trainer(cfg, plan, student, teacher, data, tokenizer, model_cfg, on_step=on_step)
    return trainer.train()
