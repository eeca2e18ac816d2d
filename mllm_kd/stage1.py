"""`python -m mllm_kd.stage1 --config FILE [key=value ...]`: distilled pre-training (DPT). See stages/stage1.py."""

from mllm_kd.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["stage1"], "python -m mllm_kd.stage1", "Stage 1: distilled pre-training (DPT)"))
