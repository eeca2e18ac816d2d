"""``python -m mllm_kd.eval``: see :mod:`mllm_kd.eval.cli`."""

from mllm_kd.eval.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
