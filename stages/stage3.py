"""Stage 3 — distilled fine-tuning (DFT).

Starts from the stage-2 result; the projector and the LLM train on instruction data against the
frozen teacher:  L = CE + MDist_resp + MDist_vis + RDist.  Reference: LLaVA-mix-665K, LR 2e-5,
global batch 128.
"""

from pathlib import Path

from mllm_kd.config import StageConfig
from mllm_kd.train.stage import run_stage
from mllm_kd.train.trainer import StepHook

NAME = "stage3"
DISTILLS = True  # against the frozen teacher
DEFAULTS = {
    "init_from": "${run_dir}/stage2",
    "trainable": {"vision": "frozen", "projector": "full", "llm": "full"},
    "optim": {"lr": 2e-5},
}


def run(cfg: StageConfig, on_step: StepHook | None = None) -> Path:
    return run_stage(cfg, cfg.model, distill=DISTILLS, on_step=on_step)
