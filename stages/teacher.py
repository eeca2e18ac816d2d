"""Training a teacher the standard LLaVA way, with the same machinery and no distillation.

``teacher_pt``: the teacher model (``teacher.model``) built fresh; the projector trains on captions.
``teacher_sft``: from ``teacher_pt``; projector + LLM train on instructions.  L = CE in both.
A recipe may also train the vision tower (``stages.teacher_pt.trainable.vision=full``) when no
pretrained vision weights exist, as the easy-VQA demo does. The result, ``${run_dir}/teacher_sft``, is
what ``teacher.checkpoint`` points at; a teacher trained elsewhere can be used directly instead.
"""

from pathlib import Path

from mllm_kd.config import StageConfig
from mllm_kd.train.stage import run_stage
from mllm_kd.train.trainer import StepHook

PT_DEFAULTS = {
    "init_from": None,
    "trainable": {"vision": "frozen", "projector": "full", "llm": "frozen"},
    "data": {"template": "caption"},
    "optim": {"lr": 1e-3},
}
SFT_DEFAULTS = {
    "init_from": "${run_dir}/teacher_pt",
    "trainable": {"vision": "frozen", "projector": "full", "llm": "full"},
    "optim": {"lr": 2e-5},
}


def run_pt(cfg: StageConfig, on_step: StepHook | None = None) -> Path:
    return run_stage(cfg, cfg.teacher.model, distill=False, on_step=on_step)


def run_sft(cfg: StageConfig, on_step: StepHook | None = None) -> Path:
    return run_stage(cfg, cfg.teacher.model, distill=False, on_step=on_step)
