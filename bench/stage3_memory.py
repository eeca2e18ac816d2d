"""Benchmark: peak resident memory of a stage-3 step — reference vs fused losses, online vs cached teacher.

    python bench/stage3_memory.py                      # V=32000, tiny models: about a minute on 2 CPU cores
    python bench/stage3_memory.py --device cuda --vocab 151936 --student-hidden 896 --teacher-hidden 2048

Same fixtures as ``bench/teacher_cache.py`` (synthetic data, a random teacher and stage-2 student saved as
checkpoints, the stage-3 teacher cache). Each variant runs the real stage 3 for ``--steps`` steps in a fresh
subprocess:

* ``reference-online``: ``loss.fused=false`` — full ``[B, T, V]`` logits of both models;
* ``fused-online``: the default fused, chunked losses (no logits tensor of either model);
* ``reference-cached``: ``teacher.cache`` + ``loss.fused=false`` — the student's full logits, no teacher;
* ``fused-cached``: ``teacher.cache`` with the chunked loss: no teacher weights and no logits tensor.

Memory is measured as in ``bench/kd_loss.py`` (its helpers are reused): on a CPU, at the end of step 1 the
freed heap is returned (``malloc_trim``), the resident set is read (``VmRSS``: the models, optimizer state
and — online — the teacher's weights) and the high-water mark is reset (``/proc/self/clear_refs``); at the
end of the last step ``VmHWM`` is the peak of the following steps. On CUDA the same with
``torch.cuda.memory_allocated`` / ``max_memory_allocated``. The table gives the resident set before the
step, the peak during it, and the difference (what the step itself adds); the LAST line printed is one
JSON object with every variant's numbers and the peak ratios against ``reference-online``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tc = _load("teacher_cache")
kd = _load("kd_loss")

VARIANTS = {
    "reference-online": ("online", ["loss.fused=false"]),
    "fused-online": ("online", []),
    "reference-cached": ("cached", ["loss.fused=false"]),
    "fused-cached": ("cached", []),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tc.add_size_args(p)
    p.set_defaults(vocab=32000)
    p.add_argument("--steps", type=int, default=3, help="steps per variant; the first is not measured")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--worker", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--fixture", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_worker(args) -> dict:
    import logging

    import torch

    logging.disable(logging.INFO)
    fx = json.loads(args.fixture)
    cuda = torch.device(args.device).type == "cuda"
    variant, extra = VARIANTS[args.worker]
    marks: dict = {}

    def on_step(step, _metrics):
        if step == 1:
            if cuda:
                torch.cuda.synchronize()
                marks["base"] = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                kd._trim_heap()
                marks["base"] = kd._rss_kib("VmRSS") * 1024
                marks["per_step"] = kd._reset_peak_rss() and kd._rss_kib("VmHWM") is not None
        elif step == args.steps:
            if cuda:
                torch.cuda.synchronize()
                marks["peak"] = torch.cuda.max_memory_allocated()
            elif marks.get("per_step"):
                marks["peak"] = kd._rss_kib("VmHWM") * 1024

    result = tc.run_variant(args, fx, variant, args.steps, extra, on_step=on_step)
    import resource

    method = "cuda.max_memory_allocated" if cuda else "VmHWM (clear_refs)"
    if "peak" not in marks:  # no per-pass reset possible: the whole process's high-water mark
        marks["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        method = "ru_maxrss (whole run)"
    return {
        "variant": args.worker,
        "base_bytes": marks["base"],
        "peak_bytes": marks["peak"],
        "step_bytes": marks["peak"] - marks["base"],
        "memory_method": method,
        "times_s": result["times_s"],
        "first_step": result["first_step"],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    import logging

    logging.disable(logging.INFO)
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (the first step is not measured)")
    fx, _, work, keep = tc.fixture_and_cache(args)
    argv = list(sys.argv[1:]) if argv is None else list(argv)
    if "--device" not in argv:
        argv += ["--device", args.device]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    results = {
        v: tc.spawn(Path(__file__).resolve(), argv, ["--worker", v, "--fixture", json.dumps(fx)])
        for v in variants
    }
    mib = 2**20
    print(
        f"# stage-3 step memory. Student {args.student_layers} x {args.student_hidden}, teacher {fx['teacher_layers']} x "
        f"{args.teacher_hidden}, V={args.vocab}, {(args.image_size // args.patch) ** 2} visual tokens/image, batch "
        f"{args.batch}, chunk {args.chunk_size}, k={args.k}, device {args.device} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'default')})\n"
    )
    print(
        "| variant | resident before the step | peak during the step | added by the step | step time (s) | method |"
    )
    print("|---|---|---|---|---|---|")
    summary: dict = {}
    for v, r in results.items():
        if "error" in r:
            print(f"| {v} | failed: {' '.join(r['error'])} | | | | |")
            summary[v] = r
            continue
        t = tc._stats(r["times_s"])["time_median_s"]  # the same median as bench/teacher_cache.py
        summary[v] = {**r, "time_median_s": t}
        print(
            f"| {v} | {r['base_bytes'] / mib:,.0f} MiB | {r['peak_bytes'] / mib:,.0f} MiB | "
            f"{r['step_bytes'] / mib:,.0f} MiB | {t:.3f} | {r['memory_method']} |"
        )
    out = {
        "device": args.device,
        "vocab": args.vocab,
        "student": [args.student_layers, args.student_hidden],
        "teacher": [fx["teacher_layers"], args.teacher_hidden],
        "batch": args.batch,
        "chunk_size": args.chunk_size,
        "k": args.k,
        "variants": summary,
    }
    ref = summary.get("reference-online", {})
    if "peak_bytes" in ref:
        out["peak_ratio"] = {
            v: s["peak_bytes"] / ref["peak_bytes"] for v, s in summary.items() if "peak_bytes" in s
        }
        out["step_ratio"] = {
            v: s["step_bytes"] / max(ref["step_bytes"], 1) for v, s in summary.items() if "step_bytes" in s
        }
        print(
            "\npeak / reference-online: "
            + ", ".join(f"{v} {x:.2f}" for v, x in out["peak_ratio"].items())
            + "; added by the step / reference-online: "
            + ", ".join(f"{v} {x:.2f}" for v, x in out["step_ratio"].items())
        )
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
