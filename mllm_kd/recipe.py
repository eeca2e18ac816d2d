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

from mllm_kd.checkpoint import build_from_config, load_checkpoint_model, resolve_checkpoint
from mllm_kd.config import ModelConfig, StageConfig
from mllm_kd.data import ImageProcessor, build_train_data
from mllm_kd.distributed import barrier, device_for, dist_info_from_env, init_distributed
from mllm_kd.engine import StepHook, Trainer, autocast_dtype, pick_device, seed_everything
from mllm_kd.errors import CheckpointError, CompatibilityError, ConfigError
from mllm_kd.model import MultimodalLM, apply_trainable, count_parameters
from mllm_kd.tokenization import load_tokenizer

log = logging.getLogger(__name__)


def stage_finished(cfg: StageConfig) -> Path | None:
    try:
        return resolve_checkpoint(cfg.output_dir)
    except CheckpointError:
        return None


def attention_device(train) -> torch.device:
    """The device that picks ``attn_implementation="auto"``: the training device when it runs in bf16
    (FlashAttention-2 needs half precision), else the CPU, which means SDPA. Weights load on the CPU."""
    device = pick_device(train)
    return device if autocast_dtype(train, device) is not None else torch.device("cpu")


def init_model(cfg: StageConfig, model_cfg: ModelConfig) -> tuple[MultimodalLM, object, ModelConfig]:
    """The model a stage starts from: the previous stage's result (``init_from``) or built fresh."""
    attn_device = attention_device(cfg.train)
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


def load_teacher(
    cfg: StageConfig, student: MultimodalLM, tokenizer, model_cfg: ModelConfig | None = None
) -> torch.nn.Module:
    """The frozen teacher, checked against the student (same vocabulary, same visual tokens).

    With ``teacher.cache`` the teacher is not loaded: a :class:`~mllm_kd.teacher_cache.CachedTeacher`
    stands in its place (checked against this stage's data, tokenizer and settings), and the loss reads
    its stored outputs. With ``teacher.quantize`` the teacher's LLM runs in 8 or 4 bits (bitsandbytes).
    """
    if cfg.teacher.cache:
        return load_cached_teacher(cfg, student, tokenizer, model_cfg or cfg.model)
    return load_teacher_model(cfg, student, tokenizer)


def load_teacher_model(cfg: StageConfig, student: MultimodalLM, tokenizer) -> MultimodalLM:
    """Load ``teacher.checkpoint`` (quantised if ``teacher.quantize``) and check it against the student."""
    if not cfg.teacher.checkpoint:
        raise ConfigError(
            f"{cfg.stage}: distillation needs teacher.checkpoint or teacher.cache "
            "(or set loss.w_resp=loss.w_vis=loss.w_rel=0)"
        )
    if cfg.teacher.quantize and cfg.train.teacher_strategy == "fsdp2":
        raise ConfigError(
            "teacher.quantize cannot be combined with train.teacher_strategy=fsdp2 (bitsandbytes weights do "
            "not shard); a quantised teacher is small enough to replicate: use train.teacher_strategy=replicate"
        )
    teacher, t_tok, _ = load_checkpoint_model(
        cfg.teacher.checkpoint, what="teacher.checkpoint", attn_device=attention_device(cfg.train)
    )
    check_compatible(teacher, t_tok, student, tokenizer, cfg.teacher.checkpoint)
    if cfg.teacher.quantize:
        n = quantize_llm(teacher.llm, cfg.teacher.quantize, teacher_device(cfg.train))
        log.info(
            "teacher: %d linear layers of its LLM quantised to %s (LM head, embeddings, vision tower and "
            "projector kept in full precision)",
            n,
            cfg.teacher.quantize,
        )
    return teacher.eval().requires_grad_(False)


def load_cached_teacher(cfg: StageConfig, student: MultimodalLM, tokenizer, model_cfg: ModelConfig):
    """The teacher cache of ``teacher.cache``, refused unless it was built for this stage's inputs."""
    from mllm_kd.teacher_cache import check_loss_settings, expected_record, open_cache

    check_loss_settings(cfg)
    cache = open_cache(cfg.teacher.cache)
    images = ImageProcessor(
        student.vision.image_size, list(model_cfg.vision.image_mean), list(model_cfg.vision.image_std)
    )
    expected = expected_record(
        cfg, tokenizer, student.num_visual_tokens, student.image_token_id, student.vocab_size, images
    )
    cache.check(expected, cfg.teacher.checkpoint)
    if cfg.train.teacher_strategy == "fsdp2":
        log.info("train.teacher_strategy=fsdp2 does not apply to a cached teacher (no weights); replicating")
        cfg.train.teacher_strategy = "replicate"
    log.info(
        "%s: teacher outputs read from the cache %s (%d samples, k=%d; built from %s)",
        cfg.stage,
        cache.directory,
        len(cache),
        cache.k,
        cache.manifest.get("teacher", {}).get("path", "?"),
    )
    return cache.eval().requires_grad_(False)


class _OnceFilter(logging.Filter):
    """Let a log message that starts with ``prefix`` through once per process."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


def teacher_device(train) -> torch.device:
    """Where the teacher will run: the trainer's device (this process's GPU under torchrun)."""
    return device_for(dist_info_from_env(), pick_device(train))


def quantize_llm(llm: torch.nn.Module, mode: str, device: torch.device | str = "cpu") -> int:
    """Replace the ``nn.Linear`` layers of an LLM (not its LM head) with bitsandbytes 8-bit / 4-bit layers.

    ``mode``: ``"8bit"`` (``Linear8bitLt``, LLM.int8 with outlier threshold 6) or ``"4bit"`` (``Linear4bit``,
    NF4). The weights are quantised on ``device``, the device the teacher runs on, and the quantised layers
    stay there: 8-bit layers quantised on the CPU and then moved with ``Module.to`` keep their int8 state
    on the CPU (``Module.to`` replaces each parameter's ``.data`` only), and bitsandbytes' CUDA matmul
    then stops with "Expected a cuda device, but got: cpu". The LM head stays a full-precision
    ``nn.Linear`` so the fused losses still apply. Returns the number of layers replaced.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ConfigError(
            f"teacher.quantize={mode} needs bitsandbytes: install the `gpu` extra (pip install -e '.[gpu]') "
            "or just bitsandbytes (pip install bitsandbytes)"
        ) from e
    if mode not in ("8bit", "4bit"):
        raise ConfigError(f"teacher.quantize must be 8bit or 4bit, got {mode!r}")
    # LLM.int8 casts float32 inputs to float16 inside every matmul (by design); say it once, not per call.
    cast_warning = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in cast_warning.filters):
        cast_warning.addFilter(_OnceFilter("MatMul8bitLt: inputs will be cast"))
    head = llm.get_output_embeddings()
    replaced = 0
    for parent in list(llm.modules()):
        if parent is head:
            continue
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            w, b = child.weight.data, None if child.bias is None else child.bias.data
            if mode == "8bit":
                new = bnb.nn.Linear8bitLt(
                    child.in_features,
                    child.out_features,
                    bias=b is not None,
                    has_fp16_weights=False,
                    threshold=6.0,
                )
                new.weight = bnb.nn.Int8Params(w.float().cpu(), requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=b is not None, quant_type="nf4"
                )
                new.weight = bnb.nn.Params4bit(w.float().cpu(), requires_grad=False, quant_type="nf4")
            if b is not None:
                new.bias = torch.nn.Parameter(b.float().cpu(), requires_grad=False)
            setattr(parent, name, new.to(device))  # .to() quantises
            replaced += 1
    return replaced


def _teacher_words(stage: str, teacher) -> str:
    if teacher is None:
        return "trained from its labels" if stage.startswith("teacher") else "no teacher"
    from mllm_kd.teacher_cache import CachedTeacher

    if isinstance(teacher, CachedTeacher):  # stored outputs, no weights
        return f"distilling from the teacher cache {teacher.directory}"
    return f"distilling from a teacher of {count_parameters(teacher) / 1e6:.2f}M parameters"


def check_compatible(teacher: MultimodalLM, t_tok, student: MultimodalLM, s_tok, where: str) -> None:
    """Teacher and student must see the same input ids: same vocabulary and visual-token layout."""
    t_vocab, s_vocab = t_tok.get_vocab(), s_tok.get_vocab()
    if t_vocab != s_vocab:
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        raise CompatibilityError(
            f"teacher {where} has a different vocabulary from the student ({len(t_vocab)} vs {len(s_vocab)} tokens; "
            f"only in teacher: {only_t}, only in student: {only_s}). Logit distillation compares distributions token "
            "by token, so both must use the same tokenizer: pick a student LLM of the teacher's family, or retrain "
            "the teacher with the student's tokenizer."
        )
    if teacher.vocab_size != student.vocab_size:
        raise CompatibilityError(
            f"teacher {where} outputs {teacher.vocab_size} logits but the student {student.vocab_size}; the LM heads "
            "must have the same width (resize one of them to the other)."
        )
    if teacher.num_visual_tokens != student.num_visual_tokens:
        raise CompatibilityError(
            f"teacher {where} produces {teacher.num_visual_tokens} visual tokens per image but the student "
            f"{student.num_visual_tokens}; they must match (same image size, patch size and drop_cls), since the "
            "visual positions are distilled one to one."
        )


def run_stage(
    cfg: StageConfig, model_cfg: ModelConfig, distill: bool, on_step: StepHook | None = None
) -> Path:
    """Set up and train one stage; returns the finished checkpoint directory (``output_dir/final``)."""
    done = stage_finished(cfg)
    if done is not None and not cfg.overwrite:
        log.info("%s already finished at %s; skipping (overwrite=true redoes it)", cfg.stage, done)
        return done
    seed_everything(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    dist_info = init_distributed(pick_device(cfg.train).type)

    student, tokenizer, model_cfg = init_model(cfg, model_cfg)
    teacher = load_teacher(cfg, student, tokenizer, model_cfg) if distill and cfg.loss.distills else None
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
    )
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
        pick_device(cfg.train),
    )
    if done is not None and dist_info.is_main:  # overwrite=true and every check passed: only now remove it
        shutil.rmtree(done)
    barrier(dist_info)
    trainer = Trainer(cfg, student, teacher, data, tokenizer, model_cfg, on_step=on_step, dist_info=dist_info)
    return trainer.train()
