#!/usr/bin/env bash
# Everything in this repository that needs a CUDA GPU, in one run (each step has a time limit; about 8 minutes on one H200):
#
#   bash bench/gpu_suite.sh OUT_DIR [DEMO_DIR]
#
# 1. the GPU tests (python -m pytest -m gpu): fused losses on CUDA, quantised teacher on CUDA under bf16
#    autocast, bitsandbytes' CUDA 8-bit AdamW, attention implementation logged;
# 2. bench/kd_loss.py at full size (V=151,936, d=896, 2 x 1024 tokens, 728 visual): float32 and bfloat16;
# 3. bench/teacher_cache.py at GPU sizes, 729 visual tokens per image, rank-32 relation factor, batch 32,
#    then with --chunk-size 2048, then under torch.profiler (where the step's time goes); bench/optimizer_step.py
#    (foreach vs fused vs 8-bit AdamW over Qwen2.5-0.5B's shapes);
# 4. with DEMO_DIR (a finished `make demo` run: data/, teacher/teacher_sft, kd/stage2): stage 3 of the
#    easy-VQA KD student with the float, 8-bit and 4-bit teacher and with adamw8bit, side by side on the
#    GPU, each evaluated on the full test split;
# 5. with STAGE3_MEMORY=1: bench/stage3_memory.py at V=151,936 (its fixtures alone take minutes; alone:
#    STAGE3_MEMORY=1 SKIP='tests|bench_kd|bench_teacher|profile|quant' bash bench/gpu_suite.sh OUT_DIR).
# 6. bench/step.py --preset paper: one whole stage-3 step (Qwen2.5-3B teacher, Qwen2.5-0.5B student, SigLIP-so400m
#    at 384 px, 4 x 2,048 tokens, bf16) for mllm_kd (online, cached, compiled, activation-checkpointed), plain
#    transformers + F.kl_div (without and with activation checkpointing) and liger-kernel's fused losses, with
#    MFU against the measured bf16 matmul peak; then the online and cached steps under torch.profiler (where
#    the time goes, which attention kernel runs) and what is live at each phase's peak (--memory-breakdown).
#    The whole of step 6 alone: SKIP='tests|bench_kd|bench_teacher|bench_opt|profile_teacher' (about 6 minutes before the
#    two checkpointed variants and the memory breakdown were added; not re-timed since).
# Packages the device lacks (liger-kernel, omegaconf, webdataset, braceexpand) are installed from .whl/ when that
# folder holds their wheels (see docs/performance.md, "On a GPU").
# Each step has its own time limit; a step that fails does not stop the others. A step fails when it exits
# non-zero or runs past its limit, or when its benchmark's JSON reports a variant that failed inside it (the
# benchmarks run each variant in a subprocess and exit 0 regardless): the log says "=== NAME: FAILED" and
# which variants, the last line lists the failed steps and the script then exits 1 (bench/suite_step.sh).
# Everything printed goes to OUT_DIR/suite.log; each benchmark's JSON line and the quantisation table go to
# OUT_DIR/results.jsonl.
# For a trial elsewhere: SKIP (a regex of step names to leave out), QUANT_ARGS (extra stage-3 overrides,
# e.g. "train.device=cpu train.max_steps=3"), EVAL_ARGS (extra eval options, e.g. "--device cpu --limit 50"),
# STEP_DEVICE and STEP_ARGS (bench/step.py's device and extra options), and for step 6's length:
# STEP_STEPS (timed steps of bench_step_paper, default 5), STEP_WARMUP (warm-up steps of every step.py run;
# default 2 for bench_step_paper and profile_step_paper, 1 for bench_step_paper_memory), STEP_VARIANTS
# (bench_step_paper's variants, default all seven; liger needs CUDA). Each variant runs once (step.py's
# --repeats 1); the profile and the memory breakdown time one step. The dry run on a CPU that
# tests/test_gpu_suite.py runs (paper widths, one layer per model, V=8,192, 768 tokens; 7 min on 2 cores
# shared with other jobs):
#   STEP_DEVICE=cpu STEP_ARGS="--layers-scale 0.03 --vision-layers 1 --vocab 8192 --batch 1 --tokens 768 \
#     --response 32 --chunk-size 256" STEP_STEPS=1 STEP_WARMUP=1 \
#     STEP_VARIANTS=mllm_kd,plain,mllm_kd_cached,mllm_kd_ckpt,plain_ckpt,mllm_kd_compiled \
#     SKIP='tests|bench_kd|bench_teacher|bench_opt|profile_teacher' bash bench/gpu_suite.sh OUT_DIR
set -u
OUT=${1:?usage: bash bench/gpu_suite.sh OUT_DIR [DEMO_DIR]}
DEMO=${2:-}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/suite.log") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
RES="$OUT/results.jsonl"
# step NAME SECONDS CMD... and suite_summary: a step that exits non-zero, runs past its limit or whose benchmark
# reports a variant that failed inside it is counted as failed; the rest of the suite still runs
# shellcheck source=bench/suite_step.sh
source "$(dirname "${BASH_SOURCE[0]}")/suite_step.sh"

if compgen -G ".whl/*.whl" >/dev/null; then  # wheels carried to a machine without a package index
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=/tmp/site:.${PYTHONPATH:+:$PYTHONPATH}
fi
# the project itself (stages/, eval/ and data_prep/ are installed under the mllm_kd namespace)
"$PY" -c "import mllm_kd.stages" 2>/dev/null ||
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . || echo "=== could not install the project"
echo "=== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
for m in ("transformers", "open_clip", "bitsandbytes", "flash_attn", "omegaconf", "webdataset", "liger_kernel", "triton"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(m, "MISSING:", type(e).__name__, e)
EOF

step tests_gpu 120 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
step bench_kd_loss_fp32 60 "$PY" bench/kd_loss.py --device cuda --dtype float32 --chunk-size 1024 --repeats 5
step bench_kd_loss_fp32_c256 60 "$PY" bench/kd_loss.py --device cuda --dtype float32 --chunk-size 256 --repeats 5
step bench_kd_loss_bf16 60 "$PY" bench/kd_loss.py --device cuda --dtype bfloat16 --chunk-size 1024 --repeats 5
TC=(bench/teacher_cache.py --device cuda --vocab 32000 --student-hidden 896 --student-layers 8 --teacher-hidden 2048
    --image-size 378 --patch 14 --relation-rank 32 --samples 256 --batch 32 --workdir /tmp/gpu_suite_tc)
step bench_teacher_cache 210 "$PY" "${TC[@]}" --steps 8 --repeats 2
# the same fixtures and cache with 8x larger loss chunks (fewer, larger kernels per step)
step bench_teacher_cache_chunk2048 90 "$PY" "${TC[@]}" --steps 8 --repeats 1 --chunk-size 2048
# AdamW over Qwen2.5-0.5B's shapes (494M parameters): foreach, the fused kernel (the default on CUDA), 8-bit
step bench_optimizer_step 90 "$PY" bench/optimizer_step.py --device cuda --hidden 896 --intermediate 4864 \
    --layers 24 --heads 14 --kv-heads 2 --vocab 151936 --with-8bit
# the same fixtures and cache again, with torch.profiler over steps 2-4 (kernels by self CUDA time)
step profile_teacher_cache 90 "$PY" "${TC[@]}" --steps 4 --profile

if [[ -n $DEMO && ! ${SKIP:-} =~ quant ]]; then
    W=${WORK:-$OUT/quant}
    mkdir -p "$W"
    # the scratch demo's KD student (make demo-scratch: runs/demo_scratch), stage 3 from its stage 2
    common=(--config configs/easyvqa_scratch.yaml "run_dir=$DEMO/seed0/kd" "data_dir=$DEMO/data" "teacher_dir=$DEMO/teacher"
        train.progress=false)
    declare -A extra=([float]="" [q8]="teacher.quantize=8bit" [q4]="teacher.quantize=4bit" [a8]="optim.name=adamw8bit")
    t0=$SECONDS
    echo "=== quant: stage 3 x 4 side by side ($(date -u +%H:%M:%S))"
    pids=()
    for v in float q8 q4 a8; do
        # shellcheck disable=SC2086
        OMP_NUM_THREADS=3 timeout 180 "$PY" -m mllm_kd.stage3 "${common[@]}" "output_dir=$W/stage3_$v" \
            ${extra[$v]} ${QUANT_ARGS:-} >"$W/$v.train.log" 2>&1 &
        pids+=($!)
    done
    wait "${pids[@]}"  # (a bare `wait` would also wait for the log's tee)
    echo "=== quant: training took $((SECONDS - t0)) s"
    t1=$SECONDS
    pids=()
    for v in float q8 q4 a8; do
        # shellcheck disable=SC2086
        (OMP_NUM_THREADS=3 timeout 90 "$PY" -m mllm_kd.eval run --model "$W/stage3_$v" --task easyvqa \
            --questions "$DEMO/data/test_questions.jsonl" --images "$DEMO/data/images" \
            --out "$W/$v.answers.jsonl" --batch-size 512 --no-progress ${EVAL_ARGS:-} >"$W/$v.eval.log" 2>&1 &&
            "$PY" -m mllm_kd.eval score --task easyvqa --predictions "$W/$v.answers.jsonl" \
                --annotations "$DEMO/data/test_answers.json" --out "$W/$v.score.json" >>"$W/$v.eval.log" 2>&1) &
        pids+=($!)
    done
    wait "${pids[@]}"
    echo "=== quant: evaluation took $((SECONDS - t1)) s"
    "$PY" - "$W" "$RES" <<'EOF'
import json, sys
from pathlib import Path
w, res = Path(sys.argv[1]), sys.argv[2]
rows, ref = [], None
for v, name in (("float", "float teacher, AdamW"), ("q8", "8-bit teacher"), ("q4", "4-bit teacher"),
                ("a8", "float teacher, adamw8bit")):
    log = w / f"{v}.train.log"
    print(f"--- {v}: last lines of {log.name}")
    print("\n".join(log.read_text().splitlines()[-4:]) if log.exists() else "(none)")
    mpath = w / f"stage3_{v}" / "metrics.jsonl"
    lines = [json.loads(x) for x in mpath.read_text().splitlines() if x.strip()] if mpath.exists() else []
    steps = [m for m in lines if "mdist_resp" in m]
    score = w / f"{v}.score.json"
    acc = json.loads(score.read_text()) if score.exists() else {}
    answers = w / f"{v}.answers.jsonl"
    ans = {}
    if answers.exists():
        for x in answers.read_text().splitlines():
            a = json.loads(x)
            ans[a["question_id"]] = a["text"]
    if v == "float":
        ref = ans
    same = sum(ans.get(k) == t for k, t in ref.items()) if ref and ans else None
    row = {"variant": v, "name": name, "steps": len(steps),
           "first": {k: steps[0][k] for k in ("mdist_resp", "mdist_vis", "rdist", "loss") if steps and k in steps[0]},
           "last_loss": steps[-1].get("loss") if steps else None,
           "train_seconds": steps[-1].get("elapsed") if steps else None,  # cumulative
           "score": acc, "answers": len(ans), "same_as_float": same}
    rows.append(row)
    print(json.dumps(row))
with open(res, "a") as f:
    f.write(json.dumps({"step": "quant_easyvqa", "rows": rows}) + "\n")
EOF
fi

[[ ${STAGE3_MEMORY:-0} == 1 ]] || SKIP="${SKIP:+$SKIP|}bench_stage3_memory"
step bench_stage3_memory 420 "$PY" bench/stage3_memory.py --device cuda --vocab 151936 --student-hidden 896 \
    --teacher-hidden 2048
# one whole stage-3 step at the paper's shapes: every variant (the compiled one last), then two profiles
# (a trial on a CPU: the dry-run command in the header)
# shellcheck disable=SC2206
STEP=(bench/step.py --preset paper --device "${STEP_DEVICE:-cuda}" ${STEP_ARGS:-})
step bench_step_paper 560 "$PY" "${STEP[@]}" --steps "${STEP_STEPS:-5}" --warmup "${STEP_WARMUP:-2}" \
    --variants "${STEP_VARIANTS:-mllm_kd,plain,liger,mllm_kd_cached,mllm_kd_ckpt,plain_ckpt,mllm_kd_compiled}"
step profile_step_paper 120 "$PY" "${STEP[@]}" --steps 1 --warmup "${STEP_WARMUP:-2}" --variants mllm_kd,mllm_kd_cached \
    --profile
step bench_step_paper_memory 300 "$PY" "${STEP[@]}" --steps 1 --warmup "${STEP_WARMUP:-1}" \
    --variants mllm_kd,mllm_kd_ckpt,plain,plain_ckpt --memory-breakdown
suite_summary
