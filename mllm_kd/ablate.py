"""Ablations of the easy-VQA demo: what each LLaVA-KD ingredient contributes.

    python -m mllm_kd.ablate [--run-dir runs/demo] [--only NAME ...] [key=value ...]

Reuses the demo's data and teacher (``RUN/data``, ``RUN/teacher``; run ``python -m mllm_kd.demo`` first)
and trains one student per variant under ``RUN/ablation/<name>``:

* ``kd``: DPT -> SFT -> DFT with every term (the demo's LLaVA-KD student);
* ``no_dpt``: plain caption pre-training (CE) -> SFT -> DFT;
* ``no_resp`` / ``no_vis`` / ``no_rel``: one distillation term switched off in DPT and DFT;
* ``vis_only``: only the visual-position terms (MDist_vis + RDist);
* ``baseline``: plain pre-training -> SFT (the demo's baseline);
* ``baseline_matched``: plain pre-training -> SFT for as many steps as SFT + DFT together, so that a gain
  of ``kd`` over it is not just more training.

Finished variants are skipped. Writes ``RUN/ablation/report.md`` and ``report.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mllm_kd.cli import setup_logging, stage_config
from mllm_kd.demo import NO_DISTILL, RECIPE, evaluate
from mllm_kd.errors import MllmKdError

log = logging.getLogger("mllm_kd.ablate")
PT, SFT, DFT = "stage1", "stage2", "stage3"

# name -> (stages, overrides per stage, what it shows)
VARIANTS: dict[str, tuple[list[str], dict[str, list[str]], str]] = {
    "kd": ([PT, SFT, DFT], {}, "DPT -> SFT -> DFT, all terms"),
    "no_dpt": ([PT, SFT, DFT], {PT: NO_DISTILL}, "plain PT instead of DPT"),
    "no_resp": (
        [PT, SFT, DFT],
        {PT: ["loss.w_resp=0"], DFT: ["loss.w_resp=0"]},
        "without MDist at response positions",
    ),
    "no_vis": (
        [PT, SFT, DFT],
        {PT: ["loss.w_vis=0"], DFT: ["loss.w_vis=0"]},
        "without MDist at visual positions",
    ),
    "no_rel": ([PT, SFT, DFT], {PT: ["loss.w_rel=0"], DFT: ["loss.w_rel=0"]}, "without RDist"),
    "vis_only": ([PT, SFT, DFT], {PT: ["loss.w_resp=0"], DFT: ["loss.w_resp=0"]}, "MDist_vis + RDist only"),
    "baseline": ([PT, SFT], {PT: NO_DISTILL}, "plain PT -> SFT"),
    "baseline_matched": (
        [PT, SFT],
        {PT: NO_DISTILL, SFT: ["stages.stage2.train.epochs=2"]},
        "plain PT -> SFT for the steps of SFT + DFT (compute-matched)",
    ),
}


def train_variant(run: Path, name: str, overrides: list[str]) -> Path:
    from mllm_kd.stages import STAGES

    stages, per_stage, _ = VARIANTS[name]
    base = [
        f"run_dir={run / 'ablation' / name}",
        f"data_dir={run / 'data'}",
        f"teacher_dir={run / 'teacher'}",
    ]
    ckpt = None
    for stage in stages:
        cfg = stage_config(RECIPE, stage, [*base, *per_stage.get(stage, []), *overrides])
        log.info("== ablation %s: %s", name, stage)
        ckpt = STAGES[stage].run(cfg)
    assert ckpt is not None
    return ckpt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mllm_kd.ablate", description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--only", nargs="*", choices=list(VARIANTS), help="run only these variants")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    setup_logging()
    run = Path(args.run_dir)
    names = args.only or list(VARIANTS)
    results = {}
    try:
        if not (run / "teacher" / "teacher_sft" / "final").is_dir():
            raise MllmKdError(
                f"no teacher in {run}/teacher: run `python -m mllm_kd.demo --run-dir {run}` first"
            )
        for name in names:
            ckpt = train_variant(run, name, args.overrides)
            answers = run / "ablation" / "eval" / f"{name}.answers.jsonl"
            scores = evaluate(run / "data", answers, name, ckpt, redo=False)
            results[name] = {
                "accuracy": scores["accuracy"] / 100.0,
                "by_type": scores["by_type"],
                "what": VARIANTS[name][2],
            }
    except MllmKdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = run / "ablation"
    (out / "report.json").write_text(json.dumps(results, indent=2))
    types = sorted(next(iter(results.values()))["by_type"])
    ref = results.get("kd", {}).get("accuracy")
    lines = [
        "| variant | what | accuracy | " + " | ".join(types) + " | vs kd |",
        "|---|---|---|" + "---|" * len(types) + "---|",
    ]
    for name, r in results.items():
        delta = f"{100 * (r['accuracy'] - ref):+.2f}" if ref is not None else ""
        lines.append(
            f"| {name} | {r['what']} | {100 * r['accuracy']:.2f} | "
            + " | ".join(f"{r['by_type'][t]:.2f}" for t in types)
            + f" | {delta} |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
