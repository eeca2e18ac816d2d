"""Stage 2 — supervised fine-tuning (SFT).

Starts from the stage-1 result; the projector and the LLM train on instruction data with the plain
next-token loss (no teacher):  L = CE.  Reference: LLaVA-mix-665K, LR 2e-5, global batch 128.
"""

from pathlib import Path

from mllm_kd.config import StageConfig
from mllm_kd.train.stage import run_stage
from mllm_kd.train.trainer import StepHook

NAME = "stage2"
DEFAULTS = {
    "init_from": "${run_dir}/stage1",
    "trainable": {"vision": "frozen", "projector": "full", "llm": "full"},
    "optim": {"lr": 2e-5},
}


def run(cfg: StageConfig, on_step: StepHook | None = None) -> Path:
    return run_stage(cfg, cfg.model, distill=False, on_step=on_step)
