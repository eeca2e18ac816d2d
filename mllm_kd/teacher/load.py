"""The frozen teacher of a distillation stage: loaded (quantised if asked) and checked against the student,
or its cache opened and checked against the stage.
"""

from __future__ import annotations

import logging

from mllm_kd.checkpoint.hf_llava import is_hf_llava_dir
from mllm_kd.checkpoint.native import load_checkpoint_model, read_model_config, resolve_checkpoint
from mllm_kd.config import ModelConfig, StageConfig
from mllm_kd.data.encoding import ImageProcessor
from mllm_kd.errors import CompatibilityError, ConfigError
from mllm_kd.model.multimodal import MultimodalLM
from mllm_kd.model.tokenization import load_tokenizer
from mllm_kd.runtime.plan import RunPlan, plan_run
from mllm_kd.teacher.cache import CachedTeacher, check_loss_settings, open_cache
from mllm_kd.teacher.fingerprint import expected_record
from mllm_kd.teacher.quantize import quantize_llm

log = logging.getLogger(__name__)


def load_teacher(
    cfg: StageConfig,
    student: MultimodalLM,
    tokenizer,
    model_cfg: ModelConfig | None = None,
    plan: RunPlan | None = None,
) -> MultimodalLM | CachedTeacher:
    """The frozen teacher, checked against the student (same vocabulary, same visual tokens).

    With ``teacher.cache`` the teacher is not loaded: a :class:`~mllm_kd.teacher.cache.CachedTeacher`
    stands in its place (checked against this stage's data, tokenizer and settings), and the loss reads
    its stored outputs. With ``teacher.quantize`` the teacher's LLM runs in 8 or 4 bits (bitsandbytes).
    """
    if cfg.teacher.cache:
        return load_cached_teacher(cfg, student, tokenizer, model_cfg or cfg.model)
    return load_teacher_model(cfg, student, tokenizer, plan, cross_tokenizer=cfg.loss.cross_tokenizer)


def load_teacher_model(
    cfg: StageConfig,
    student: MultimodalLM,
    tokenizer,
    plan: RunPlan | None = None,
    cross_tokenizer: bool = False,
) -> MultimodalLM:
    """Load ``teacher.checkpoint`` (quantised if ``teacher.quantize``) and check it against the student
    (its vocabulary and visual-token count too, unless ``cross_tokenizer``: the online loss handles both)."""
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
    plan = plan or plan_run(cfg)
    teacher, t_tok, _ = load_checkpoint_model(
        cfg.teacher.checkpoint, what="teacher.checkpoint", attn_device=plan.attn_device
    )
    check_compatible(teacher, t_tok, student, tokenizer, cfg.teacher.checkpoint, cross_tokenizer)
    if cfg.teacher.quantize:
        n = quantize_llm(teacher.llm, cfg.teacher.quantize, plan.device)  # where the teacher will run
        log.info(
            "teacher: %d linear layers of its LLM quantised to %s (LM head, embeddings, vision tower and "
            "projector kept in full precision)",
            n,
            cfg.teacher.quantize,
        )
    return teacher.eval().requires_grad_(False)


def load_cached_teacher(
    cfg: StageConfig, student: MultimodalLM, tokenizer, model_cfg: ModelConfig
) -> CachedTeacher:
    """The teacher cache of ``teacher.cache``, refused unless it was built for this stage's inputs."""
    check_loss_settings(cfg)
    cache = open_cache(cfg.teacher.cache)
    images = ImageProcessor(
        student.vision.image_size, list(model_cfg.vision.image_mean), list(model_cfg.vision.image_std)
    )
    expected = expected_record(
        cfg, tokenizer, student.num_visual_tokens, student.image_token_id, student.vocab_size, images
    )
    cache.check(expected, cfg.teacher.checkpoint)
    if cfg.loss.w_emb > 0 and cache.projected_images is None:
        raise ConfigError(
            f"loss.w_emb={cfg.loss.w_emb} distils the teacher's projected images, which the teacher cache "
            f"{cache.directory} does not keep: rebuild it with teacher.cache_projected_images=true "
            "(python -m mllm_kd.cache_teacher ... teacher.cache_projected_images=true)"
        )
    log.info(
        "%s: teacher outputs read from the cache %s (%d samples, k=%d; built from %s)",
        cfg.stage,
        cache.directory,
        len(cache),
        cache.k,
        cache.manifest.get("teacher", {}).get("path", "?"),
    )
    return cache


def check_compatible(
    teacher: MultimodalLM, t_tok, student: MultimodalLM, s_tok, where: str, cross_tokenizer: bool = False
) -> None:
    """Teacher and student must see the same input ids: same vocabulary and visual-token layout, unless
    ``cross_tokenizer`` (``loss.cross_tokenizer``: each reads its own encoding; nothing to check here)."""
    if cross_tokenizer:
        return
    t_vocab, s_vocab = t_tok.get_vocab(), s_tok.get_vocab()
    if t_vocab != s_vocab:
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        raise CompatibilityError(
            f"teacher {where} has a different vocabulary from the student ({len(t_vocab)} vs {len(s_vocab)} tokens; "
            f"only in teacher: {only_t}, only in student: {only_s}). Logit distillation compares distributions token "
            "by token, so both must use the same tokenizer: pick a student LLM of the teacher's family, or set "
            "loss.cross_tokenizer=true to distil across vocabularies (docs/cross-tokenizer.md)."
        )
    if teacher.vocab_size != student.vocab_size:
        raise CompatibilityError(
            f"teacher {where} outputs {teacher.vocab_size} logits but the student {student.vocab_size}; the LM heads "
            "must have the same width (resize one of them to the other), or set loss.cross_tokenizer=true."
        )
    if teacher.num_visual_tokens != student.num_visual_tokens:
        raise CompatibilityError(
            f"teacher {where} produces {teacher.num_visual_tokens} visual tokens per image but the student "
            f"{student.num_visual_tokens}; they must match (same image size, patch size and drop_cls), since the "
            "visual positions are distilled one to one (loss.cross_tokenizer=true pools the larger grid instead)."
        )


def load_teacher_preprocessing(cfg: StageConfig, teacher: MultimodalLM):
    """The teacher's own tokenizer and image preprocessing (``loss.cross_tokenizer``), read from the mllm_kd
    checkpoint ``teacher.checkpoint`` (``teacher``: the loaded model). Returns ``(tokenizer, ImageProcessor)``."""
    if is_hf_llava_dir(cfg.teacher.checkpoint):
        raise ConfigError(
            f"loss.cross_tokenizer needs teacher.checkpoint to be an mllm_kd checkpoint; {cfg.teacher.checkpoint} "
            "is a Hugging Face LLaVA directory"
        )
    ckpt = resolve_checkpoint(cfg.teacher.checkpoint, "teacher.checkpoint")
    vision = read_model_config(ckpt).vision
    images = ImageProcessor(teacher.vision.image_size, list(vision.image_mean), list(vision.image_std))
    return load_tokenizer(ckpt / "tokenizer"), images
