"""bench/gpu_suite.sh: its step runner counts a benchmark whose variants failed inside it as a failed step, the
step-count knobs reach bench/step.py, and (slow) the whole-step part runs end to end on a CPU at tiny sizes,
so that the script a GPU session runs is known to work before device time is spent on it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout"
)

OK = {"variants": {"mllm_kd": {"variant": "mllm_kd", "median_s": 1.0}}, "speed_vs_plain": 1.5}
BROKEN = {
    "variants": {
        "mllm_kd": {"variant": "mllm_kd", "median_s": 1.0},
        "plain": {"variant": "plain", "error": ["Traceback (most recent call last):", "RuntimeError: boom"]},
        "liger": {"variant": "liger", "error": ["ModuleNotFoundError: No module named 'liger_kernel'"]},
    }
}


def _run_steps(tmp_path: Path, script: str) -> subprocess.CompletedProcess:
    """``script`` run by bash after sourcing the step runner, with PY and RES set."""
    res = tmp_path / "results.jsonl"
    prelude = f"PY={sys.executable!r}; RES={str(res)!r}; source bench/suite_step.sh\n"
    return subprocess.run(
        ["bash", "-c", prelude + script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_step_reports_failures_inside_a_benchmark_and_goes_on(tmp_path):
    script = f"""
step bench_broken 10 echo {json.dumps(json.dumps(BROKEN))}
step bench_ok 10 echo {json.dumps(json.dumps(OK))}
step profile_broken 10 echo {json.dumps(json.dumps(BROKEN))}
step crash 10 bash -c 'echo dying; exit 3'
step too_slow 1 sleep 5
step bench_garbled 10 echo '{{"variants": '
SKIP=bench_skipped step bench_skipped 10 false
suite_summary
echo "summary status $?"
"""
    proc = _run_steps(tmp_path, script)
    log = proc.stdout
    assert proc.returncode == 0, proc.stderr
    # the benchmark itself exits 0: the step says so, then that it failed and which variants did
    assert "=== bench_broken: exit 0 after" in log
    assert "=== bench_broken: FAILED, inside the benchmark:" in log
    assert "===   plain: RuntimeError: boom" in log
    assert "===   liger: ModuleNotFoundError: No module named 'liger_kernel'" in log
    assert "=== profile_broken: FAILED, inside the benchmark:" in log  # not only bench_* steps
    assert "=== bench_ok: exit 0 after" in log and "bench_ok: FAILED" not in log
    assert "=== crash: exit 3 after" in log and "=== crash: FAILED" in log
    assert "=== too_slow: exit 124 after" in log and "=== too_slow: FAILED" in log
    assert "=== bench_garbled: FAILED, inside the benchmark:" in log and "not JSON" in log
    assert "=== bench_skipped: skipped" in log
    last = [line for line in log.splitlines() if line.startswith("=== done")]
    assert len(last) == 1 and last[0].endswith(
        "5 step(s) FAILED: bench_broken profile_broken crash too_slow bench_garbled"
    ), last
    assert log.rstrip().endswith("summary status 1")
    # the bench_* steps' JSON lines are kept, failed or not, each tagged with its step
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == ["bench_broken", "bench_ok"]
    assert rows[0]["variants"]["plain"]["error"][-1] == "RuntimeError: boom"
    assert rows[1]["speed_vs_plain"] == 1.5


def test_summary_passes_when_no_step_failed(tmp_path):
    proc = _run_steps(
        tmp_path, f"step bench_ok 10 echo {json.dumps(json.dumps(OK))}\nstep tests 10 true\nsuite_summary"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("no step failed")
    assert "FAILED" not in proc.stdout


FAKE_PYTHON = """#!{python}
# bench/step.py answers with one broken variant and logs its options; the step runner's JSON check runs for real
import json, os, sys
if sys.argv[1:2] == ["bench/step.py"]:
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps(sys.argv[2:]) + "\\n")
    print(json.dumps({broken}))
elif sys.argv[1:2] == ["-c"] and "json" in sys.argv[2]:
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
else:  # the project import check and the environment report
    sys.stdin.close()
"""


def _suite_with_fake_python(
    tmp_path: Path, **env: str
) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable, broken=repr(BROKEN)))
    fake.chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    full_env = {
        **os.environ,
        "PYTHON": str(fake),
        "FAKE_CALLS": str(calls),
        "SKIP": "tests|bench_kd|bench_teacher|bench_opt|profile_teacher",
        **env,
    }
    proc = subprocess.run(
        ["bash", "bench/gpu_suite.sh", str(tmp_path / "out")],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, [json.loads(x) for x in calls.read_text().splitlines()]


def _opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_suite_exits_1_when_a_step_benchmark_fails_inside_and_runs_the_rest(tmp_path):
    proc, calls = _suite_with_fake_python(tmp_path)
    log = (tmp_path / "out" / "suite.log").read_text()
    assert proc.returncode == 1, log[-3000:]
    # every step ran although the first one failed
    assert len(calls) == 3, calls
    for name in ("bench_step_paper", "profile_step_paper", "bench_step_paper_memory"):
        assert f"=== {name}: exit 0 after" in log and f"=== {name}: FAILED" in log, name
    assert log.rstrip().endswith(
        "3 step(s) FAILED: bench_step_paper profile_step_paper bench_step_paper_memory"
    )
    # without the knobs: the GPU run's step counts and variants
    bench, profile, memory = calls
    assert _opt(bench, "--device") == "cuda"
    assert (_opt(bench, "--steps"), _opt(bench, "--warmup")) == ("5", "2")
    assert _opt(bench, "--variants").split(",") == [
        "mllm_kd", "plain", "liger", "mllm_kd_cached", "mllm_kd_ckpt", "plain_ckpt", "mllm_kd_compiled"
    ]  # fmt: skip
    assert (_opt(profile, "--steps"), _opt(profile, "--warmup")) == ("1", "2") and "--profile" in profile
    assert (_opt(memory, "--steps"), _opt(memory, "--warmup")) == ("1", "1")
    assert "--memory-breakdown" in memory
    assert "--repeats" not in bench  # one fresh process per variant


def test_step_knobs_reach_every_step_benchmark(tmp_path):
    _, calls = _suite_with_fake_python(
        tmp_path,
        STEP_DEVICE="cpu",
        STEP_ARGS="--layers-scale 0.03 --vocab 512",
        STEP_STEPS="1",
        STEP_WARMUP="1",
        STEP_VARIANTS="mllm_kd,plain",
    )
    bench, profile, memory = calls
    for argv in calls:
        assert _opt(argv, "--device") == "cpu" and _opt(argv, "--vocab") == "512"
        assert _opt(argv, "--warmup") == "1" and _opt(argv, "--steps") == "1"
    assert _opt(bench, "--variants") == "mllm_kd,plain"
    assert _opt(profile, "--variants") == "mllm_kd,mllm_kd_cached"
    assert _opt(memory, "--variants") == "mllm_kd,mllm_kd_ckpt,plain,plain_ckpt"


def test_quick_trial_options_shrink_only_what_they_name():
    """bench/step.py's --vision-layers and --vocab (the dry run's) override the preset's, leaving the widths."""
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "bench" / "step.py")
    step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step)
    paper = step.PRESETS["paper"]
    args = step.parse_args(
        ["--preset", "paper", "--layers-scale", "0.03", "--vision-layers", "1", "--vocab", "8192"]
    )
    sh = step.shapes(args)
    assert sh["student"]["vocab_size"] == sh["teacher"]["vocab_size"] == 8192
    assert sh["student"]["num_hidden_layers"] == sh["teacher"]["num_hidden_layers"] == 1
    assert sh["vision"]["num_hidden_layers"] == 1
    for part in ("student", "teacher", "vision"):
        for key in ("hidden_size", "intermediate_size", "num_attention_heads"):
            assert sh[part][key] == paper[part][key], (part, key)
    assert (sh["vision"]["image_size"], sh["vision"]["patch_size"]) == (384, 14)  # 729 visual tokens
    # the preset itself is not changed
    assert paper["student"]["vocab_size"] == 151936 and paper["vision"]["num_hidden_layers"] == 27
    full = step.step_flops(step.parse_args(["--preset", "paper", "--layers-scale", "0.03"]), cached=False)
    small = step.step_flops(args, cached=False)
    layer = 4 * 1152**2 + 2 * 1152 * 4304  # one SigLIP-so400m layer's matmul weights
    left_out = 2 * layer * 4 * 729 * 26  # 26 of 27 layers, 729 patches of each of the preset's 4 images
    assert full["student_vision"] - small["student_vision"] == left_out
    assert small["total"] < full["total"]


# The dry run's sizes: the paper preset's widths (Qwen2.5-3B's 2048 and 0.5B's 896, SigLIP-so400m's 1152 at
# 384 px, 729 visual tokens), one decoder layer each, one vision layer, an 8,192-word vocabulary, 768 tokens
# (32 response), loss chunks of 256 rows (several per step, as on the GPU).
DRY_RUN = {
    "STEP_DEVICE": "cpu",
    "STEP_ARGS": "--layers-scale 0.03 --vision-layers 1 --vocab 8192 --batch 1 --tokens 768 --response 32 "
    "--chunk-size 256",
    "STEP_STEPS": "1",
    "STEP_WARMUP": "1",
    "STEP_VARIANTS": "mllm_kd,plain,mllm_kd_cached,mllm_kd_ckpt,plain_ckpt,mllm_kd_compiled",  # liger: CUDA
    "SKIP": "tests|bench_kd|bench_teacher|bench_opt|profile_teacher",
}


@pytest.mark.slow
def test_gpu_suite_step_benchmarks_run_on_a_cpu(tmp_path):
    out = tmp_path / "suite"
    env = {**os.environ, "PYTHON": sys.executable, **DRY_RUN}
    proc = subprocess.run(
        ["bash", "bench/gpu_suite.sh", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    log = (out / "suite.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    for step in ("bench_step_paper", "profile_step_paper", "bench_step_paper_memory"):
        assert f"=== {step}: exit 0" in log and f"=== {step}: FAILED" not in log, log[-3000:]
    assert "no step failed" in log
    results = {r["step"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(results) == {"bench_step_paper", "bench_step_paper_memory"}
    assert set(results["bench_step_paper"]["variants"]) == set(DRY_RUN["STEP_VARIANTS"].split(","))
    memory = results["bench_step_paper_memory"]["variants"]
    assert set(memory) == {"mllm_kd", "mllm_kd_ckpt", "plain", "plain_ckpt"}
    for r in results.values():
        assert not [v for v in r["variants"].values() if "error" in v], r["variants"]
    for v in memory.values():
        assert v["memory_breakdown"]["peak_bytes"] > 0, v
    step = results["bench_step_paper"]
    for key in ("speed_vs_plain", "memory_vs_plain", "mfu", "memory_ckpt_vs_plain_ckpt"):
        assert isinstance(step[key], float | int) and step[key] > 0, (key, step)
    assert abs(step["loss_vs_plain"]) < 1e-4  # same weights, same batch: the same loss
    assert "--- profile of mllm_kd_cached" in log
