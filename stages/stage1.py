"""Stage 1 — distilled pre-training (DPT).

The student starts from its base LLM with a fresh projector. Only the projector trains, on
image-caption pairs, against the frozen teacher:  L = CE + MDist_resp + MDist_vis + RDist.
Reference: LLaVA-558K, LR 1e-3, global batch 256, one epoch. With every distillation weight at 0 this
is the plain LLaVA caption pre-training (the baseline).
"""

from pathlib import Path

from mllm_kd.config import StageConfig
from mllm_kd.train.stage import run_stage
from mllm_kd.train.trainer import StepHook

NAME = "stage1"
DISTILLS = True  # against the frozen teacher
DEFAULTS = {
    "init_from": None,
    "trainable": {"vision": "frozen", "projector": "full", "llm": "frozen"},
    "data": {"template": "caption"},
    "optim": {"lr": 1e-3},
}


def run(cfg: StageConfig, on_step: StepHook | None = None) -> Path:
    return run_stage(cfg, cfg.model, distill=DISTILLS, on_step=on_step)
