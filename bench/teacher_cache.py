"""Benchmark: a stage-3 (DFT) step with the online teacher against the same step with a cached teacher.

    python bench/teacher_cache.py                              # tiny sizes, a few minutes at most on 2 CPU cores
    python bench/teacher_cache.py --device cuda --vocab 32000 --student-hidden 896 --student-layers 8 \\
        --teacher-hidden 2048 --image-size 378 --patch 14 --relation-rank 32 --samples 256 --batch 32

The parent builds, in a work directory: the synthetic smoke data (``--samples`` images, multi-turn
questions), a random teacher and a random student (Qwen2 LLMs; the student reuses the teacher's CLIP
vision tower, as in the recipes) saved as mllm_kd checkpoints, and the teacher cache of the stage-3 data
(``python -m mllm_kd.cache_teacher``'s :func:`~mllm_kd.teacher.build.build_teacher_cache`). Then each variant
runs the real stage 3 (:func:`mllm_kd.stages.stage3.run`: data loading, student forward/backward, the loss,
AdamW) for ``--steps`` optimizer steps in a fresh subprocess, ``--repeats`` times, alternating the order of
the variants; step times come from the stage's own ``metrics.jsonl`` (``elapsed``, which covers data loading,
forward, backward and the optimizer step). The first step of each run is a warm-up and is left out; the
table gives the median of the runs' medians, the spread of those medians and the spread of all steps.

The sizes are chosen so that the teacher's LLM (head included) costs about ``--compute-ratio`` times the
student's per token in forward FLOPs (6 by default, like 3B vs 0.5B): the teacher's layer count is derived
from it unless ``--teacher-layers`` is given. A training step runs the student forward + backward (about 3
forward passes) and, online, the teacher forward too; the cached step leaves the teacher out, so the
speedup is about ``(3 + ratio) / 3`` when the LLMs dominate (3.0 at ratio 6).

The LAST line printed is one JSON object with both variants' times, ``speedup`` (online / cached median
step time of a pair of adjacent runs; the median over the pairs), ``speedups_per_run`` (each pair),
``speedup_ceiling`` ((3 + ratio) / 3), ``bytes_per_token`` (cache bytes per distilled position, relation
matrices included) and ``bytes_per_token_topk`` (the top-k part alone), and the first-step loss terms of
both variants.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

VARIANTS = ("online", "cached")


def add_size_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--vocab", type=int, default=2048, help="LM-head width of both LLMs")
    p.add_argument("--student-hidden", type=int, default=128)
    p.add_argument("--student-layers", type=int, default=4)
    p.add_argument("--teacher-hidden", type=int, default=256)
    p.add_argument("--teacher-layers", type=int, default=None, help="default: from --compute-ratio")
    p.add_argument(
        "--compute-ratio", type=float, default=6.0, help="teacher / student forward FLOPs per token"
    )
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch", type=int, default=8, help="(image-size / patch)^2 visual tokens per image")
    p.add_argument("--vision-hidden", type=int, default=64)
    p.add_argument("--samples", type=int, default=48, help="images in the synthetic data (+ 1/8 text-only)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--k", type=int, default=32, help="teacher.cache_topk")
    p.add_argument("--relation-rank", type=int, default=0, help="teacher.cache_relation_rank")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="data.num_workers (default: 8 on CUDA, 0 on a CPU; on a GPU, decoding images in the main process "
        "can take longer than the step itself)",
    )
    p.add_argument(
        "--teacher-sharpen",
        type=float,
        default=12.0,
        help="scale the random teacher's final norm (its logits) so its distributions are peaked like a trained one's",
    )
    p.add_argument("--workdir", default=None, help="keep the fixtures here (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more stage-3 config override for every variant (repeatable), e.g. --set optim.fused=true",
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_args(p)
    p.add_argument(
        "--steps", type=int, default=8, help="optimizer steps per variant (the first is a warm-up)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="fresh processes per variant, run in alternating order (online, cached, cached, online, ...) so "
        "that a drift of the machine's speed hits both; the table gives the median of the runs' medians",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also print, per variant, torch.profiler's operators by self time over the steps after the first",
    )
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--fixture", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _default_device() -> str:
    from mllm_kd.runtime.device import pick_device

    return pick_device().type


# ------------------------------------------------------------------------------------------ fixtures
def _llm_config(hidden: int, layers: int, vocab: int) -> dict:
    heads = max(2, hidden // 64)
    return {
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "max_position_embeddings": 2048,
        "vocab_size": vocab,
        "tie_word_embeddings": True,
    }


def _flops_per_token(cfg: dict) -> float:
    """Forward multiply-adds per token of a Qwen2 config: decoder linears + LM head (attention scores aside)."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = d * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f
    return cfg["num_hidden_layers"] * per_layer + v * d


def build_fixture(args, work: Path) -> dict:
    """Data, teacher, stage-2 student and the stage-3 teacher cache under ``work``; returns their paths."""
    import torch

    from mllm_kd.checkpoint.native import build_from_config, save_checkpoint
    from mllm_kd.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
    from mllm_kd.data_prep.synthetic import make_synthetic
    from mllm_kd.model.tokenization import load_tokenizer

    torch.manual_seed(args.seed)
    data = work / "data"
    if not (data / "instruct.json").is_file():
        make_synthetic(data, n_images=args.samples, size=args.image_size, seed=args.seed)
    tok = load_tokenizer(data / "tokenizer")
    s_llm = _llm_config(args.student_hidden, args.student_layers, args.vocab)
    layers = args.teacher_layers
    if layers is None:  # the teacher depth that gives the requested compute ratio
        one = (
            _flops_per_token(_llm_config(args.teacher_hidden, 1, args.vocab))
            - args.vocab * args.teacher_hidden
        )
        target = args.compute_ratio * _flops_per_token(s_llm) - args.vocab * args.teacher_hidden
        layers = max(1, round(target / one))
    t_llm = _llm_config(args.teacher_hidden, layers, args.vocab)
    vision = VisionConfig(
        backend="hf",
        config={
            "model_type": "clip_vision_model",
            "hidden_size": args.vision_hidden,
            "intermediate_size": 2 * args.vision_hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": args.image_size,
            "patch_size": args.patch,
        },
    )
    teacher_dir, student_dir = work / "teacher", work / "stage2"
    if not (teacher_dir / "model.safetensors").is_file():
        t_cfg = ModelConfig(vision=vision, projector=ProjectorConfig(), llm=LLMConfig(config=t_llm))
        teacher = build_from_config(t_cfg, tok)
        with torch.no_grad():
            teacher.llm.get_decoder().norm.weight.mul_(args.teacher_sharpen)
        save_checkpoint(teacher_dir, teacher, t_cfg, tok, None, {"step": 0})
    if not (student_dir / "model.safetensors").is_file():
        s_cfg = ModelConfig(
            vision=VisionConfig(checkpoint=str(teacher_dir)),
            projector=ProjectorConfig(),
            llm=LLMConfig(config=s_llm),
        )
        save_checkpoint(student_dir, build_from_config(s_cfg, tok), s_cfg, tok, None, {"step": 0})
    return {
        "work": str(work),
        "data": str(data),
        "teacher": str(teacher_dir),
        "student": str(student_dir),
        "cache": str(work / "cache"),
        "teacher_layers": layers,
        "compute_ratio": _flops_per_token(t_llm) / _flops_per_token(s_llm),
        "student_flops_per_token": _flops_per_token(s_llm),
        "teacher_flops_per_token": _flops_per_token(t_llm),
    }


def num_workers(args) -> int:
    if args.num_workers is not None:
        return args.num_workers
    return 8 if str(args.device).startswith("cuda") else 0


def stage_overrides(args, fx: dict, out_dir: str, steps: int, extra: list[str] = ()) -> list[str]:
    return [
        f"run_dir={fx['work']}",
        f"output_dir={out_dir}",
        f"init_from={fx['student']}",
        f"teacher.checkpoint={fx['teacher']}",
        f"data.path={fx['data']}/instruct.json",
        f"data.image_folder={fx['data']}/images",
        "data.max_length=4096",
        f"data.num_workers={num_workers(args)}",
        f"train.batch_size={args.batch}",
        f"train.max_steps={steps}",
        f"train.device={args.device}",
        f"train.precision={args.precision}",
        f"train.seed={args.seed}",
        "train.progress=false",
        "optim.lr=1e-4",
        "optim.warmup_ratio=0",
        f"loss.chunk_size={args.chunk_size}",
        f"teacher.cache_topk={args.k}",
        f"teacher.cache_relation_rank={args.relation_rank}",
        "overwrite=true",
        *args.set,
        *extra,
    ]


def stage3_config(args, fx: dict, out_dir: str, steps: int, extra: list[str] = ()):
    from mllm_kd.recipe import resolve_stage_config
    from mllm_kd.stages import STAGES

    return resolve_stage_config(
        {}, "stage3", STAGES["stage3"].defaults, stage_overrides(args, fx, out_dir, steps, extra)
    )


def build_cache(args, fx: dict) -> dict:
    """The stage-3 teacher cache (built once per work directory); returns its manifest."""
    from mllm_kd.teacher.build import build_teacher_cache
    from mllm_kd.teacher.cache_format import MANIFEST

    manifest = Path(fx["cache"]) / MANIFEST
    if manifest.is_file():
        return json.loads(manifest.read_text())
    cfg = stage3_config(args, fx, str(Path(fx["work"]) / "unused"), 1)
    started = time.perf_counter()
    out = build_teacher_cache(cfg, fx["cache"], progress=False)
    out["stats"]["wall_seconds"] = time.perf_counter() - started
    return out


# -------------------------------------------------------------------------------------------- worker
def run_variant(args, fx: dict, variant: str, steps: int, extra: list[str] = (), on_step=None) -> dict:
    """Run stage 3 for ``steps`` steps (``variant``: online or cached teacher); per-step seconds + step 1."""
    from mllm_kd.stages import STAGES

    out = Path(fx["work"]) / f"run-{variant}-{os.getpid()}"
    extra = [*extra, f"teacher.cache={fx['cache']}"] if variant == "cached" else list(extra)
    cfg = stage3_config(args, fx, str(out), steps, extra)
    first: dict = {}

    def hook(step, metrics):
        first.setdefault(step, metrics)
        if on_step is not None:
            on_step(step, metrics)

    STAGES["stage3"].run(cfg, on_step=hook)
    elapsed = [json.loads(ln)["elapsed"] for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    shutil.rmtree(out, ignore_errors=True)
    times = [b - a for a, b in zip([0.0, *elapsed[:-1]], elapsed)]
    return {"variant": variant, "times_s": times, "first_step": first.get(1, {})}


def _worker_main(args) -> int:
    import logging

    logging.disable(logging.INFO)
    fx = json.loads(args.fixture)
    if not args.profile:
        print(json.dumps(run_variant(args, fx, args.worker, args.steps)))
        return 0
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = str(args.device).startswith("cuda")
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))

    def start_after_first(step, _metrics):
        if step == 1:  # the first step is a warm-up, as in the timings
            prof.start()

    result = run_variant(args, fx, args.worker, args.steps, on_step=start_after_first)
    prof.stop()
    if cuda:
        torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    path = Path(fx["work"]) / f"profile-{args.worker}.txt"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=20))
    print(json.dumps({**result, "profile": str(path)}))
    return 0


def spawn(script: Path, argv: list[str], extra: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, str(script), *argv, *extra], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fixture_and_cache(args) -> tuple[dict, dict, Path, bool]:
    args.device = args.device or _default_device()
    keep = args.workdir is not None
    work = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="bench_teacher_cache-"))
    work.mkdir(parents=True, exist_ok=True)
    fx = build_fixture(args, work)
    manifest = build_cache(args, fx)
    return fx, manifest, work, keep


def _stats(times: list[float]) -> dict:
    timed = times[1:] if len(times) > 1 else times
    return {
        "time_median_s": statistics.median(timed),
        "time_min_s": min(timed),
        "time_max_s": max(timed),
        "times_s": times,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return _worker_main(args)
    import logging

    logging.disable(logging.INFO)
    fx, manifest, work, keep = fixture_and_cache(args)
    argv = list(sys.argv[1:]) if argv is None else list(argv)
    if "--device" not in argv:
        argv += ["--device", args.device]
    repeats = 1 if args.profile else max(1, args.repeats)
    order = [VARIANTS if i % 2 == 0 else VARIANTS[::-1] for i in range(repeats)]
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for variants in order:
        for v in variants:
            runs[v].append(
                spawn(Path(__file__).resolve(), argv, ["--worker", v, "--fixture", json.dumps(fx)])
            )
    for v, rs in runs.items():
        if "profile" in rs[0]:
            print(
                f"## profile of the {v} variant (steps 2-{args.steps})\n{Path(rs[0]['profile']).read_text()}"
            )
    st = manifest["stats"]
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(
        f"# stage-3 step: online vs cached teacher. Student {args.student_layers} x {args.student_hidden}, teacher "
        f"{fx['teacher_layers']} x {args.teacher_hidden} (forward FLOPs/token ratio {fx['compute_ratio']:.2f}), V={args.vocab}, "
        f"{(args.image_size // args.patch) ** 2} visual tokens/image, batch {args.batch}, k={args.k}, "
        f"{num_workers(args)} data workers, device {args.device} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={threads})"
        + (f", overrides {' '.join(args.set)}" if args.set else "")
        + f"; {repeats} run(s) per variant of {args.steps} steps, the first step of each left out\n"
    )
    print(
        "| variant | step time: median of the runs' medians (s) | runs' medians: min-max (s) | all steps: min-max (s) "
        "| first-step MDist_resp | MDist_vis | RDist |"
    )
    print("|---|---|---|---|---|---|---|")
    summary: dict = {}
    for v, rs in runs.items():
        failed = [r for r in rs if "error" in r]
        if failed:
            print(f"| {v} | failed: {' '.join(failed[0]['error'])} | | | | | |")
            summary[v] = failed[0]
            continue
        per_run = [_stats(r["times_s"]) for r in rs]
        medians = [x["time_median_s"] for x in per_run]
        f = rs[0]["first_step"]
        summary[v] = {
            "time_median_s": statistics.median(medians),
            "run_medians_s": medians,
            "time_min_s": min(x["time_min_s"] for x in per_run),
            "time_max_s": max(x["time_max_s"] for x in per_run),
            "times_s": [r["times_s"] for r in rs],
            "first_step": f,
        }
        print(
            f"| {v} | {summary[v]['time_median_s']:.3f} | {min(medians):.3f}-{max(medians):.3f} "
            f"| {summary[v]['time_min_s']:.3f}-{summary[v]['time_max_s']:.3f} "
            f"| {f.get('mdist_resp', float('nan')):.4g} | {f.get('mdist_vis', float('nan')):.4g} | {f.get('rdist', float('nan')):.4g} |"
        )
    out = {
        "device": args.device,
        "vocab": args.vocab,
        "student": [args.student_layers, args.student_hidden],
        "teacher": [fx["teacher_layers"], args.teacher_hidden],
        "compute_ratio": fx["compute_ratio"],
        "batch": args.batch,
        "k": args.k,
        "relation_rank": args.relation_rank,
        "num_workers": num_workers(args),
        "visual_tokens": (args.image_size // args.patch) ** 2,
        "samples": st["samples"],
        "distilled_tokens": st["rows"],
        "cache_bytes": st["total_bytes"],
        "bytes_per_token": st["bytes_per_distilled_token"],
        "bytes_per_token_topk": st["bytes_per_row_topk"],
        "cache_build_seconds": st.get("wall_seconds", st["seconds"]),
        "mean_leftover_mass": st["mean_leftover_mass"],
        "variants": summary,
    }
    if all("time_median_s" in summary.get(v, {}) for v in VARIANTS):
        # per repeat: online / cached of the same pair of adjacent runs (a drift of the machine hits both)
        out["speedups_per_run"] = [
            a / b for a, b in zip(summary["online"]["run_medians_s"], summary["cached"]["run_medians_s"])
        ]
        out["speedup"] = statistics.median(out["speedups_per_run"])
        # the student's forward + backward ~ 3 forward passes; online, plus the teacher's forward
        out["speedup_ceiling"] = (3 + fx["compute_ratio"]) / 3
        print(
            f"\ncached teacher: {out['speedup']:.2f}x faster per step (per run: "
            f"{', '.join(f'{x:.2f}' for x in out['speedups_per_run'])}; the FLOP count's ceiling "
            f"(3 + {fx['compute_ratio']:.2f}) / 3 = {out['speedup_ceiling']:.2f}); cache {st['total_bytes'] / 2**20:.2f} MiB, "
            f"{out['bytes_per_token']:.1f} bytes per distilled token ({out['bytes_per_token_topk']} of them the top-k "
            f"part), built in {out['cache_build_seconds']:.1f} s (one teacher pass over {st['samples']} samples); "
            f"the teacher's mass outside its top {args.k}: {st['mean_leftover_mass']:.3f} on average"
        )
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))
    return 0 if all("error" not in r for rs in runs.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
