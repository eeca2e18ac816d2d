"""Ablations of the easy-VQA demo: what each LLaVA-KD ingredient contributes.

    python -m mllm_kd.apps.easyvqa.ablate [--run-dir runs/demo] [--recipe pretrained|scratch] [--seeds 0,1]
                             [--only NAME ...] [--on-policy-fraction F] [--jobs N]
                             [--questions N] [--captions N] [--student-questions N] [key=value ...]

Reuses the demo's data and teacher (``RUN/data``, ``RUN/teacher``; run ``python -m mllm_kd.apps.easyvqa.demo`` with the
same ``--recipe`` first) and trains one student per variant under ``RUN/ablation/seed<S>/<name>``:

* ``kd``: DPT -> SFT -> DFT with every term, every DFT here on the students' SFT questions (the demo's
  LLaVA-KD student with ``--transfer-questions 0``; the pretrained recipe's own DFTs on a transfer set);
* ``no_dpt``: plain caption pre-training (CE) -> SFT -> DFT: ``baseline``'s own SFT result, then DFT;
* ``no_resp`` / ``no_vis`` / ``no_rel``: one distillation term switched off in DPT and DFT;
* ``dft_ce_only``: ``kd``'s own SFT result, then stage 3 with every distillation term off, i.e. one more
  SFT epoch on the LLaVA-KD student's own schedule: what stage 3 adds beyond the extra training
  (``no_resp`` is the visual-terms-only variant: MDist_vis + RDist);
* ``baseline``: plain pre-training -> SFT (the demo's baseline);
* ``baseline_matched``: plain pre-training -> SFT for as many steps as SFT + DFT together, so that a gain
  of ``kd`` over it is not just more training;
* ``dpt_matched``: ``kd``'s own DPT result, then SFT for as many steps as SFT + DFT (``baseline_matched``
  with DPT instead of plain pre-training): the teacher in pre-training only;
* ``dpt_dft``: ``kd``'s own DPT result, then DFT (CE and every distillation term) for as many steps as SFT + DFT:
  LLaVA-KD's losses with its SFT and DFT as one run (DFT's loss contains SFT's CE), compute-matched;
* ``dft_on_policy``: ``kd``'s own SFT result, then its DFT with on-policy distillation (GKD,
  ``loss.on_policy_fraction`` = ``--on-policy-fraction``, 0.5 by default as TRL's ``lmbda``): the same
  stage-3 config, data and optimizer steps as ``kd``'s DFT, so the two differ only in whose responses
  the student learns from;
* ``dft_seq_kd``: the same with sequence-level KD (``loss.sequence_kd``: the teacher's responses);
* ``dft_resp_only``: the same with MDist at the response positions only (DFT without MDist_vis and RDist);
* ``dft_teacher_right``: the same with MDist at the response only where the teacher's most likely answer
  token is the label (``loss.resp_where_teacher_right``); elsewhere CE alone teaches;
* ``dft_hidden``: the same with intermediate-layer distillation added (``loss.w_hidden=1``: each student
  layer's input hidden state against the teacher's at the depth ``model.llm.keep_layers`` maps it to; a
  student of the teacher's width, the online teacher).

A variant that continues another's stage trains that one only up to the stage it needs (``dpt_matched``
alone trains ``kd``'s DPT, not its SFT and DFT). Finished variants are skipped; ``kd``, ``baseline`` and
``baseline_matched`` reuse the demo's students of the same seed (``RUN/seed<S>/kd``, ``baseline``,
``matched``: a demo run without a transfer set) when no ``key=value`` override is given, since they are the
same runs (and the DFT-only variants start from that ``kd`` student's ``stage2``). ``--seeds 0,1`` runs every variant
for each seed; the table gives the mean over seeds and each seed's accuracy. ``--jobs N``
trains N variants or seeds at a time in separate processes, the CPU threads split between them (small
models do not use two cores well, so two jobs on a 2-core machine take about half the time). Writes
``RUN/ablation/report.md`` and ``report.json``. ``--questions`` / ``--captions`` / ``--student-questions``: the
size the demo ran ``RUN`` at (its size options); they are part of the run, so the demo's students are still
reused.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mllm_kd.apps.easyvqa.options import SIZE_FLAGS, add_size_options, seed_list, size_overrides
from mllm_kd.apps.easyvqa.roles import NO_DISTILL, RECIPES
from mllm_kd.apps.easyvqa.scoring import evaluate
from mllm_kd.apps.easyvqa.training import matched_epochs
from mllm_kd.cli import setup_process, stage_config
from mllm_kd.errors import ArgumentParser, MllmKdError, exit_code

log = logging.getLogger("mllm_kd.apps.easyvqa.ablate")
PT, SFT, DFT = "stage1", "stage2", "stage3"

# name -> (stages, overrides per stage, what it shows)
VARIANTS: dict[str, tuple[list[str], dict[str, list[str]], str]] = {
    "kd": ([PT, SFT, DFT], {}, "DPT -> SFT -> DFT, all terms"),
    "no_dpt": ([DFT], {}, "plain PT instead of DPT"),
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
    "dft_ce_only": ([DFT], {DFT: NO_DISTILL}, "kd's SFT -> stage 3 with CE only (no teacher)"),
    "baseline": ([PT, SFT], {PT: NO_DISTILL}, "plain PT -> SFT"),
    "baseline_matched": (
        [PT, SFT],
        {PT: NO_DISTILL},
        "plain PT -> SFT for the steps of SFT + DFT (compute-matched)",
    ),
    "dpt_matched": (
        [SFT],
        {},
        "kd's DPT -> SFT for the steps of SFT + DFT (compute-matched, no teacher after DPT)",
    ),
    "dpt_dft": (
        [DFT],
        {},
        "kd's DPT -> DFT for the steps of SFT + DFT (SFT and DFT as one run, compute-matched)",
    ),
    "dft_on_policy": ([DFT], {}, "kd's SFT -> DFT with on-policy distillation (GKD), kd's DFT steps"),
    "dft_seq_kd": ([DFT], {DFT: ["loss.sequence_kd=true"]}, "kd's SFT -> DFT on the teacher's responses"),
    "dft_resp_only": (
        [DFT],
        {DFT: ["loss.w_vis=0", "loss.w_rel=0"]},
        "kd's SFT -> DFT with MDist at the response only (no MDist_vis, no RDist)",
    ),
    "dft_teacher_right": (
        [DFT],
        {DFT: ["loss.resp_where_teacher_right=true"]},
        "kd's SFT -> DFT with MDist_resp only at answer tokens the teacher gets right",
    ),
    "dft_hidden": (
        [DFT],
        {DFT: ["loss.w_hidden=1"]},
        "kd's SFT -> DFT with the teacher's hidden states distilled too (loss.w_hidden=1, online teacher)",
    ),
}
# Compute-matched variants: their stage trains for the optimizer steps of SFT + DFT (the recipe's epochs of each,
# same data and batch: the demo's count, training.matched_epochs).
MATCHED: dict[str, str] = {"baseline_matched": SFT, "dpt_matched": SFT, "dpt_dft": DFT}
# Variants that start from another variant's stage result (the demo's, or this ablation's with the overrides)
# instead of training the same stages again: variant -> (the variant it continues, that variant's stage).
STARTS_FROM: dict[str, tuple[str, str]] = {
    "dpt_matched": ("kd", PT),
    "dpt_dft": ("kd", PT),
    **{
        n: ("kd", SFT)
        for n in (
            "dft_ce_only",
            "dft_on_policy",
            "dft_seq_kd",
            "dft_resp_only",
            "dft_teacher_right",
            "dft_hidden",
        )
    },
    "no_dpt": ("baseline", SFT),  # plain PT -> SFT is the baseline, stage for stage
}


# Variants that are runs of the demo itself: (sub-directory of RUN, its last stage, the demo's role).
DEMO_RUNS = {
    "kd": ("kd", DFT, "student_kd"),
    "baseline": ("baseline", SFT, "student_baseline"),
    "baseline_matched": ("matched", SFT, "student_matched"),
}


def _demo_checkpoint(run: Path, name: str, overrides: list[str], seed: int) -> Path | None:
    """The demo's finished student that is variant ``name``, if there is one (none with overrides)."""
    if name not in DEMO_RUNS or overrides:
        return None
    sub, last, _ = DEMO_RUNS[name]
    ckpt = run / f"seed{seed}" / sub / last / "final"
    return ckpt if ckpt.is_dir() else None


def train_variant(
    run: Path,
    name: str,
    overrides: list[str],
    recipe: str,
    seed: int,
    quick: bool = False,
    on_policy_fraction: float = 0.5,
    sizes: tuple[int | None, ...] = (None, None, None),
    until: str | None = None,
) -> Path:
    """Train one variant (``quick``: the demo's tiny ``--quick`` sizes; ``sizes``: the demo's size options,
    :data:`~mllm_kd.apps.easyvqa.options.SIZE_FLAGS`; ``until``: only its stages up to that one, for a
    variant that continues from it); returns the final checkpoint of its last stage trained."""
    from mllm_kd.stages import STAGES

    stages, per_stage, _ = VARIANTS[name]
    if until is not None:
        stages = stages[: stages.index(until) + 1]
    demo_ckpt = _demo_checkpoint(run, name, overrides, seed)
    if demo_ckpt and until is not None:  # the demo's run has every stage: the one asked for
        demo_ckpt = demo_ckpt.parent.parent / until / "final"
    if demo_ckpt:
        log.info("== ablation %s: the demo's run %s", name, demo_ckpt)
        return demo_ckpt
    spec = RECIPES[recipe]
    base = [
        f"run_dir={run / 'ablation' / f'seed{seed}' / name}",
        f"data_dir={run / 'data'}",
        f"teacher_dir={run / 'teacher'}",
        f"train.seed={seed}",
    ]
    if name in STARTS_FROM:
        parent, stage = STARTS_FROM[name]
        ckpt = train_variant(run, parent, overrides, recipe, seed, quick, sizes=sizes, until=stage)
        base.append(f"init_from={ckpt.parent.parent / stage}")
    if name == "dft_on_policy":
        per_stage = {DFT: [f"loss.on_policy_fraction={on_policy_fraction}"]}
    common = [*([*spec.quick, "train.progress=false"] if quick else []), *size_overrides(*sizes)]
    ckpt = None
    for stage in stages:
        extra = [*common, *per_stage.get(stage, []), *overrides]
        if MATCHED.get(name) == stage:  # after the user's overrides, which may set the recipe's epochs
            extra.append(f"stages.{stage}.train.epochs={matched_epochs(spec, [*common, *overrides])}")
        cfg = stage_config(spec.config, stage, [*base, *extra])
        log.info("== ablation %s: %s", name, stage)
        ckpt = STAGES[stage].run(cfg)
    assert ckpt is not None
    return ckpt


def _train_in_parallel(
    run: Path,
    names: list[str],
    jobs: int,
    overrides: list[str],
    recipe: str,
    seeds: tuple[int, ...],
    quick: bool,
    on_policy_fraction: float,
    sizes: tuple[int | None, ...],
    split: str,
) -> None:
    """Train and answer ``names`` for every seed in ``jobs`` child processes at a time, threads split evenly;
    each child answers the ``split`` questions (the parent's), which the parent then reads.

    The work is dealt as units of (seed, variants): each variant on its own, except that a variant and
    those that continue from it (:data:`STARTS_FROM`) form one unit (it is trained once, first). Units
    of every seed share the ``jobs`` slots, so ``--seeds 0,1 --only kd dft_on_policy --jobs 2`` trains
    the two seeds side by side."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    logs = run / "ablation" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    units: list[tuple[int, list[str]]] = []
    for seed in seeds:
        # The variants the demo already trained cost nothing: deal out only the others.
        todo = [n for n in names if not _demo_checkpoint(run, n, overrides, seed)]
        followers: dict[str, list[str]] = {}
        for n in todo:
            if n in STARTS_FROM:
                followers.setdefault(STARTS_FROM[n][0], []).append(n)
        grouped = {n for p, after in followers.items() for n in (p, *after)}
        units += [(seed, [n]) for n in todo if n not in grouped]
        units += [(seed, [p, *after] if p in todo else after) for p, after in followers.items()]

    def train(unit: tuple[int, list[str]]) -> Path | None:
        seed, group = unit
        cmd = [sys.executable, "-m", "mllm_kd.apps.easyvqa.ablate", "--run-dir", str(run), "--only", *group]
        cmd += ["--recipe", recipe, "--seeds", str(seed), "--on-policy-fraction", str(on_policy_fraction)]
        cmd += ["--split", split]
        cmd += ["--quick"] if quick else []
        cmd += [a for flag, n in zip(SIZE_FLAGS, sizes) if n is not None for a in (flag, str(n))]
        cmd += overrides
        log_path = logs / f"seed{seed}-{group[0]}.log"
        log.info("seed %d (%d threads): %s -> %s", seed, threads, " ".join(group), log_path)
        with log_path.open("w") as out:
            code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        return log_path if code != 0 else None

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # a thread per slot, each waiting on one child
        failed = [str(path) for path in pool.map(train, units) if path is not None]
    if failed:
        raise MllmKdError(f"ablation jobs failed; see {', '.join(failed)}")


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m mllm_kd.apps.easyvqa.ablate", description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--only", nargs="*", choices=list(VARIANTS), help="run only these variants")
    p.add_argument(
        "--jobs", type=int, default=1, help="variants or seeds trained at a time (separate processes)"
    )
    p.add_argument("--recipe", choices=sorted(RECIPES), default="pretrained", help="the demo's recipe")
    p.add_argument("--seed", type=int, default=0, help="the students' seed (the demo's seed<S> runs)")
    p.add_argument(
        "--seeds", type=seed_list, default=None, help="several seeds, e.g. 0,1 (instead of --seed)"
    )
    p.add_argument(
        "--on-policy-fraction",
        type=float,
        default=0.5,
        help="loss.on_policy_fraction of the dft_on_policy variant (GKD's lambda)",
    )
    p.add_argument("--split", choices=("test", "val"), default="test", help="the questions scored")
    p.add_argument(
        "--quick", action="store_true", help="the tiny sizes of `mllm_kd.apps.easyvqa.demo --quick`"
    )
    add_size_options(p)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    setup_process()
    run = Path(args.run_dir)
    sizes = (args.questions, args.captions, args.student_questions)
    names = args.only or list(VARIANTS)
    seeds = args.seeds or (args.seed,)
    per_seed: dict[str, dict[int, dict]] = {name: {} for name in names}
    try:
        if not (run / "teacher" / "teacher_sft" / "final").is_dir():
            raise MllmKdError(
                f"no teacher in {run}/teacher: run `python -m mllm_kd.apps.easyvqa.demo --run-dir {run}` first"
            )
        if args.jobs > 1:
            _train_in_parallel(
                run,
                names,
                args.jobs,
                args.overrides,
                args.recipe,
                seeds,
                args.quick,
                args.on_policy_fraction,
                sizes,
                args.split,
            )
        for seed in seeds:
            for name in names:  # finished variants and answer files are reused: this only collects
                ckpt = train_variant(
                    run, name, args.overrides, args.recipe, seed, args.quick, args.on_policy_fraction, sizes
                )
                per_seed[name][seed] = _score(run, name, ckpt, args.split, args.overrides, seed)
    except MllmKdError as e:
        return exit_code(e)
    results = {name: _mean_over_seeds(name, per_seed[name]) for name in names}
    if "dft_on_policy" in names:
        results["dft_on_policy"]["on_policy_fraction"] = args.on_policy_fraction
    out = run / "ablation"
    (out / "report.json").write_text(json.dumps(results, indent=2))
    lines = report_table(results)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _score(run: Path, name: str, ckpt: Path, split: str, overrides: list[str], seed: int) -> dict:
    answers = run / "ablation" / "eval" / split / f"{name}-seed{seed}.answers.jsonl"
    if ckpt == _demo_checkpoint(run, name, overrides, seed):
        role = DEMO_RUNS[name][2]
        demo_answers = run / "eval" / split / f"{role}-seed{seed}.answers.jsonl"
        if demo_answers.is_file():
            answers = demo_answers  # the demo answered these questions with this very checkpoint
    return evaluate(run / "data", split, answers, f"{name}-seed{seed}", ckpt, redo=False)


def _mean_over_seeds(name: str, scores: dict[int, dict]) -> dict:
    """Accuracy (a fraction) and per-type accuracy (percent), the mean over seeds, and each seed's accuracy."""
    n = len(scores)
    types = sorted(next(iter(scores.values()))["by_type"])
    return {
        "accuracy": sum(s["accuracy"] for s in scores.values()) / n / 100.0,
        "by_type": {t: sum(s["by_type"][t] for s in scores.values()) / n for t in types},
        "seeds": {str(seed): s["accuracy"] / 100.0 for seed, s in scores.items()},
        "what": VARIANTS[name][2],
    }


def report_table(results: dict) -> list[str]:
    """The markdown table: mean accuracy over seeds, per type, each seed, and the difference from kd."""
    types = sorted(next(iter(results.values()))["by_type"])
    ref = results.get("kd", {}).get("accuracy")
    lines = [
        "| variant | what | accuracy | " + " | ".join(types) + " | seeds | vs kd |",
        "|---|---|---|" + "---|" * len(types) + "---|---|",
    ]
    for name, r in results.items():
        delta = f"{100 * (r['accuracy'] - ref):+.2f}" if ref is not None else ""
        each = " / ".join(f"{100 * a:.2f}" for a in r["seeds"].values())
        lines.append(
            f"| {name} | {r['what']} | {100 * r['accuracy']:.2f} | "
            + " | ".join(f"{r['by_type'][t]:.2f}" for t in types)
            + f" | {each} | {delta} |"
        )
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
