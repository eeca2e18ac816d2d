"""The GPU suite's dry run on a CPU: bench/gpu_suite.sh's whole-step part (step 6) at tiny depth, so the
script a GPU session runs is known to work before device time is spent on it. Slow: it builds the paper
preset's model widths (Qwen2.5-3B / 0.5B, SigLIP-so400m) at a twentieth of their depth."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash")
def test_gpu_suite_step_benchmarks_run_on_a_cpu(tmp_path):
    out = tmp_path / "suite"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "SKIP": "tests|bench_kd|bench_teacher|bench_opt|profile",
        "STEP_DEVICE": "cpu",
        "STEP_ARGS": "--layers-scale 0.05 --batch 1 --tokens 1024 --response 200",
    }
    proc = subprocess.run(
        ["bash", "bench/gpu_suite.sh", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    log = (out / "suite.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    for step in ("bench_step_paper", "bench_step_paper_memory"):
        assert f"=== {step}: exit 0" in log, log[-3000:]
    results = {r["step"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(results) == {"bench_step_paper", "bench_step_paper_memory"}
    for r in results.values():  # a variant that could not run is reported in the JSON, not by the exit status
        assert not [v for v in r["variants"].values() if "error" in v], r["variants"]
    step = results["bench_step_paper"]
    # the ratios the goals are stated in, computed from the variants measured in the same run
    for key in ("speed_vs_plain", "memory_vs_plain", "mfu", "memory_ckpt_vs_plain_ckpt"):
        assert isinstance(step[key], float | int) and step[key] > 0, (key, step)
