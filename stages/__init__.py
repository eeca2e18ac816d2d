"""The stage recipes: what each stage trains, freezes and optimises (see each module's docstring).

``STAGES`` maps a stage name to its defaults and run function, in pipeline order.
"""

from __future__ import annotations

from dataclasses import dataclass

from mllm_kd.stages import stage1, stage2, stage3, teacher


@dataclass(frozen=True)
class Stage:
    name: str
    defaults: dict
    run: object  # (StageConfig, on_step=None) -> Path
    summary: str
    distills: bool = False  # whether the stage has a teacher (its losses include MDist / RDist)


STAGES: dict[str, Stage] = {
    "teacher_pt": Stage(
        "teacher_pt", teacher.PT_DEFAULTS, teacher.run_pt, "teacher caption pre-training (CE)"
    ),
    "teacher_sft": Stage(
        "teacher_sft", teacher.SFT_DEFAULTS, teacher.run_sft, "teacher instruction tuning (CE)"
    ),
    "stage1": Stage(
        "stage1",
        stage1.DEFAULTS,
        stage1.run,
        "distilled pre-training, DPT (CE + MDist + RDist)",
        stage1.DISTILLS,
    ),
    "stage2": Stage("stage2", stage2.DEFAULTS, stage2.run, "supervised fine-tuning, SFT (CE)"),
    "stage3": Stage(
        "stage3",
        stage3.DEFAULTS,
        stage3.run,
        "distilled fine-tuning, DFT (CE + MDist + RDist)",
        stage3.DISTILLS,
    ),
}
