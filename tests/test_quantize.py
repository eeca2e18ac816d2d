"""A quantised teacher (teacher.quantize) and the 8-bit AdamW (optim.name=adamw8bit), via bitsandbytes."""

import builtins
import logging

import pytest
import torch
from conftest import SMOKE

from mllm_kd.checkpoint.native import load_checkpoint_model
from mllm_kd.cli import stage_config
from mllm_kd.data.datasets import Collator, build_train_data
from mllm_kd.data.encoding import ImageProcessor
from mllm_kd.errors import ConfigError, TrainingError
from mllm_kd.model.multimodal import apply_trainable
from mllm_kd.stages import STAGES
from mllm_kd.teacher.load import load_teacher
from mllm_kd.train.objective import LossComputer
from mllm_kd.train.optim import build_optimizer

bnb = pytest.importorskip("bitsandbytes")

# Relative Frobenius error of the teacher's logits (float teacher = 1): LLM.int8 keeps about 3 significant
# digits (measured 1.2e-3 on the smoke teacher), NF4 about 2 (measured 1.4e-2).
LOGIT_RTOL = {"8bit": 1e-2, "4bit": 5e-2}


def _cfg(smoke_teacher, stage="stage1", *extra):
    teacher = smoke_teacher / "teacher_sft"
    return stage_config(
        SMOKE,
        stage,
        [
            f"run_dir={smoke_teacher}",
            f"teacher.checkpoint={teacher}",
            f"model.vision.checkpoint={teacher}",
            "train.batch_size=4",
            *extra,
        ],
    )


def _student_and_batch(cfg):
    from mllm_kd.train.stage import init_model

    student, tok, model_cfg = init_model(cfg, cfg.model)
    images = ImageProcessor(
        student.vision.image_size, model_cfg.vision.image_mean, model_cfg.vision.image_std
    )
    data = build_train_data(cfg.data, tok, student.num_visual_tokens, student.image_token_id, images)
    return student, tok, Collator(tok.pad_token_id)([data.dataset[i] for i in range(6)])


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_teacher_gives_logits_close_to_the_float_teacher(smoke_teacher, mode):
    cfg = _cfg(smoke_teacher)
    student, tok, batch = _student_and_batch(cfg)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    float_teacher = load_teacher(cfg, student, tok)
    cfg.teacher.quantize = mode
    teacher = load_teacher(cfg, student, tok)
    linear = bnb.nn.Linear8bitLt if mode == "8bit" else bnb.nn.Linear4bit
    layers = [m for m in teacher.llm.modules() if isinstance(m, linear)]
    assert len(layers) == 7 * teacher.llm.config.num_hidden_layers  # q k v o gate up down
    assert type(teacher.llm.get_output_embeddings()) is torch.nn.Linear  # the head stays full precision
    # what the trainer does with a teacher: move it, keep float32 on a CPU
    teacher.to("cpu", dtype=torch.float32).eval().requires_grad_(False)
    with torch.no_grad():
        ref, out = float_teacher(*args).logits, teacher(*args).logits
    mask = batch["attention_mask"].bool()
    rel = (out - ref)[mask].norm() / ref[mask].norm()
    assert rel < LOGIT_RTOL[mode], rel
    assert (out[mask].argmax(-1) == ref[mask].argmax(-1)).float().mean() > 0.95


def test_stage_with_a_quantized_teacher_runs_and_its_losses_are_close(smoke_teacher, tmp_path):
    losses = {}
    for mode in (None, "8bit"):
        cfg = _cfg(
            smoke_teacher,
            "stage1",
            f"output_dir={tmp_path}/{mode}",
            "train.max_steps=2",
            f"teacher.quantize={mode or 'none'}",
        )
        STAGES["stage1"].run(cfg, on_step=lambda s, m, mode=mode: losses.setdefault((mode, s), m))
    for key in ("mdist_resp", "mdist_vis", "rdist"):
        assert losses[("8bit", 1)][key] == pytest.approx(losses[(None, 1)][key], rel=0.05, abs=1e-4)


def test_quantized_teacher_refuses_fsdp2_sharding(smoke_teacher):
    with pytest.raises(ConfigError, match="teacher_strategy=replicate"):  # at config load, before any model
        _cfg(smoke_teacher, "stage1", "teacher.quantize=4bit", "train.teacher_strategy=fsdp2")
    cfg = _cfg(smoke_teacher, "stage1", "teacher.quantize=4bit")
    cfg.train.teacher_strategy = "fsdp2"  # a config built in code: the loader refuses it too
    student, tok, _ = _student_and_batch(cfg)
    with pytest.raises(ConfigError, match="teacher_strategy=replicate"):
        load_teacher(cfg, student, tok)


def test_adamw8bit_trains(smoke_teacher):
    """Stage-2-like training of the smoke teacher's LLM with the 8-bit AdamW: the loss goes down."""
    cfg = _cfg(smoke_teacher, "stage2", "init_from=null", "optim.name=adamw8bit", "optim.lr=3e-3")
    model, _, _ = load_checkpoint_model(smoke_teacher / "teacher_sft")
    _, _, batch = _student_and_batch(cfg)
    apply_trainable(model, cfg.trainable)
    opt = build_optimizer(model, cfg.optim)
    assert isinstance(opt, bnb.optim.AdamW8bit)
    assert {g["name"] for g in opt.param_groups} == {"projector", "rest"}
    loss_fn = LossComputer(cfg, None)
    losses = []
    for _ in range(6):
        total, _ = loss_fn(model, batch)
        total.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(total.detach()))
    assert losses[-1] < losses[0] * 0.9, losses
    big = max((p for g in opt.param_groups for p in g["params"]), key=lambda p: p.numel())
    assert opt.state[big]["state1"].dtype == torch.uint8  # the moments really are 8-bit


def test_missing_bitsandbytes_is_a_clear_error(smoke_teacher, monkeypatch):
    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    cfg = _cfg(smoke_teacher, "stage1", "teacher.quantize=8bit", "optim.name=adamw8bit")
    student, tok, _ = _student_and_batch(cfg)
    with pytest.raises(ConfigError, match=r"install the `gpu` extra"):
        load_teacher(cfg, student, tok)
    with pytest.raises(TrainingError, match=r"install the `gpu` extra"):
        build_optimizer(student, cfg.optim)


def test_attention_choice_is_logged_when_a_checkpoint_is_loaded(smoke_teacher, caplog):
    """model.build_llm logs the attention implementation, also for an LLM rebuilt from a checkpoint's config."""
    with caplog.at_level(logging.INFO, logger="mllm_kd.model"):
        load_checkpoint_model(smoke_teacher / "teacher_sft")
    assert "LLM Qwen2ForCausalLM with sdpa attention" in caplog.text  # CPU: always SDPA
