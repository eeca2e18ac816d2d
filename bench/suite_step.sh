# The step runner of bench/gpu_suite.sh, sourced by it (and by tests/test_gpu_suite.py):
#
#   PY=python3 RES=OUT_DIR/results.jsonl; source bench/suite_step.sh
#   step NAME SECONDS CMD...   # run CMD with a time limit; a failure is recorded, the caller goes on
#   suite_summary              # the failed steps, then `return 1` if there were any
#
# A step fails when CMD exits non-zero (124: it ran past its limit) or when its last line is a JSON object
# whose "variants" (a benchmark's per-variant results, bench/step.py's and the others') hold an "error": the
# benchmarks catch a variant's crash in its subprocess and exit 0. SKIP (a regex of step names) leaves steps out.

SUITE_FAILED=()
SUITE_LAST=$(mktemp)

# Reads a benchmark's JSON last line on stdin; appends it to RES (with "step": NAME) when asked; prints the
# variants that report an error, one "name: last error line" per line; exits 1 when the line is not JSON.
SUITE_CHECK='
import json, sys
name, res = sys.argv[1], sys.argv[2]
try:
    d = json.load(sys.stdin)
except ValueError as e:
    print(f"the last line is not JSON: {e}")
    sys.exit(1)
if res:
    with open(res, "a") as f:
        f.write(json.dumps({**d, "step": name}) + "\n")
variants = d.get("variants") if isinstance(d, dict) else None
rows = variants.items() if isinstance(variants, dict) else enumerate(variants or [])
for key, r in rows:
    if isinstance(r, dict) and "error" in r:
        err = r["error"] if isinstance(r["error"], list) else [r["error"]]
        print(r.get("variant", key), err[-1] if err else "(no message)", sep=": ")
'

step() {  # step NAME SECONDS CMD...: run with a limit, keep the JSON last line of a benchmark
    local name=$1 limit=$2 t0=$SECONDS rc bad=""
    shift 2
    if [[ -n ${SKIP:-} && $name =~ $SKIP ]]; then echo "=== $name: skipped"; return 0; fi
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$SUITE_LAST"
    rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    if tail -n 1 "$SUITE_LAST" | grep -q '^{'; then  # a benchmark's result (bench_* steps' go to RES)
        bad=$(tail -n 1 "$SUITE_LAST" | "$PY" -c "$SUITE_CHECK" "$name" "$([[ $name == bench_* ]] && echo "$RES")" 2>&1)
    fi
    if ((rc != 0)) || [[ -n $bad ]]; then
        SUITE_FAILED+=("$name")
        echo "=== $name: FAILED${bad:+, inside the benchmark:}"
        [[ -z $bad ]] || sed 's/^/===   /' <<<"$bad"
    fi
    return 0
}

suite_summary() {  # the steps that failed; status 1 if any did
    if ((${#SUITE_FAILED[@]})); then
        echo "=== done ($(date -u +%H:%M:%S)): ${#SUITE_FAILED[@]} step(s) FAILED: ${SUITE_FAILED[*]}"
        return 1
    fi
    echo "=== done ($(date -u +%H:%M:%S)): no step failed"
}
