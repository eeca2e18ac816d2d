"""`python -m mllm_kd.pipeline --config FILE [key=value ...]`: teacher (if needed), then stages 1-3.

A convenience over running `mllm_kd.teacher`, `mllm_kd.stage1`, `stage2`, `stage3` one by one; finished
stages are skipped. With a teacher trained elsewhere, run the three stage commands instead.
"""

from mllm_kd.cli import main

if __name__ == "__main__":
    raise SystemExit(
        main(
            ["teacher_pt", "teacher_sft", "stage1", "stage2", "stage3"],
            "python -m mllm_kd.pipeline",
            "All stages",
        )
    )
