"""`python -m mllm_kd.stage3 --config FILE [key=value ...]`: distilled fine-tuning (DFT). See stages/stage3.py."""

from mllm_kd.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["stage3"], "python -m mllm_kd.stage3", "Stage 3: distilled fine-tuning (DFT)"))
