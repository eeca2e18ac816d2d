"""`python -m mllm_kd.teacher --config FILE [key=value ...]`: train the teacher (caption PT, then SFT).

See stages/teacher.py. Finished stages are skipped, so re-running only does what is missing.
"""

from mllm_kd.cli import main

if __name__ == "__main__":
    raise SystemExit(
        main(["teacher_pt", "teacher_sft"], "python -m mllm_kd.teacher", "Train the teacher: PT then SFT")
    )
