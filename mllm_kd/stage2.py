"""`python -m mllm_kd.stage2 --config FILE [key=value ...]`: supervised fine-tuning (SFT). See stages/stage2.py."""

from mllm_kd.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["stage2"], "python -m mllm_kd.stage2", "Stage 2: supervised fine-tuning (SFT)"))
