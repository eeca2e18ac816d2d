"""The main job: easy-VQA, from teacher to distilled student, in one command.

    python -m mllm_kd.demo [--run-dir runs/demo] [--seed 0] [--teacher-dir DIR] [--redo] [--quick] [key=value ...]

1. prepares easy-VQA (``RUN/data``: captions, one record per train question, test questions, a BPE tokenizer);
2. trains the teacher: caption pre-training with its vision tower trained from scratch, then SFT
   (``RUN/teacher``);
3. trains the student the plain way: caption pre-training (CE only) then SFT (``RUN/baseline``);
4. trains the student the LLaVA-KD way: DPT -> SFT -> DFT (``RUN/kd``);
5. answers the whole test split with each model (``RUN/eval/*.answers.jsonl``) and scores them;
6. writes ``RUN/report.md``, ``RUN/report.json`` and PNG plots.

Every step is skipped when its result exists (``--redo`` redoes them). ``key=value`` overrides apply to
every stage (e.g. ``loss.w_rel=0``, ``stages.stage3.train.epochs=2``); see configs/easyvqa.yaml.
``--quick`` is the tests' variant: a few hundred examples and tiny models.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from mllm_kd.checkpoint import load_checkpoint_model
from mllm_kd.cli import setup_logging, stage_config
from mllm_kd.errors import MllmKdError
from mllm_kd.model import count_parameters

log = logging.getLogger("mllm_kd.demo")
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "easyvqa.yaml"
NO_DISTILL = ["loss.w_resp=0", "loss.w_vis=0", "loss.w_rel=0"]
QUICK = [  # the tests' variant: tiny models, short runs
    "teacher.model.vision.config.width=8",
    "teacher.model.vision.config.head_width=8",
    "teacher.model.llm.config.hidden_size=32",
    "teacher.model.llm.config.intermediate_size=64",
    "teacher.model.llm.config.num_hidden_layers=1",
    "model.llm.config.hidden_size=16",
    "model.llm.config.intermediate_size=32",
    "model.llm.config.num_hidden_layers=1",
    "model.llm.config.num_attention_heads=2",
    "model.llm.config.num_key_value_heads=1",
    "stages.teacher_pt.train.epochs=1",
    "stages.teacher_sft.train.epochs=1",
    "train.progress=false",
]

# (name, run directory under RUN, stages, extra overrides, the model that gets evaluated)
ROLES = {
    "teacher": ("teacher", ["teacher_pt", "teacher_sft"], [], "teacher_sft"),
    "student_baseline": ("baseline", ["stage1", "stage2"], NO_DISTILL, "stage2"),
    "student_kd": ("kd", ["stage1", "stage2", "stage3"], [], "stage3"),
}


def train_role(
    run: Path, role: str, overrides: list[str], redo: bool, teacher_dir: Path | None = None
) -> tuple[Path, float, list[str]]:
    """Train one model's stages; returns its final checkpoint, the training seconds, and the stages.

    ``teacher_dir`` (default ``run/teacher``) holds the teacher's stages, trained there if missing.
    """
    from mllm_kd.stages import STAGES

    sub, stages, extra, _ = ROLES[role]
    teacher_dir = teacher_dir or run / "teacher"
    common = [
        f"run_dir={teacher_dir if role == 'teacher' else run / sub}",
        f"data_dir={run / 'data'}",
        f"teacher_dir={teacher_dir}",
        *extra,
        *overrides,
    ]
    if redo:
        common.append("overwrite=true")
    seconds = 0.0
    ckpt = None
    for stage in stages:
        cfg = stage_config(RECIPE, stage, common)
        log.info("== %s: %s -> %s", role, stage, cfg.output_dir)
        ckpt = STAGES[stage].run(cfg)
        seconds += json.loads((ckpt / "trainer_state.json").read_text())["elapsed"]
    assert ckpt is not None
    return ckpt, seconds, stages


def evaluate(data: Path, answers: Path, role: str, ckpt: Path, redo: bool, batch_size: int = 128) -> dict:
    """Answer the test split of ``data`` into ``answers`` (greedy) and score it (exact match, per type)."""
    from mllm_kd.eval.core import read_predictions
    from mllm_kd.eval.tasks.easyvqa import EasyVQATask
    from mllm_kd.generate import Generator, answer_file, read_questions

    if redo and answers.exists():
        answers.unlink()
    model, tok, model_cfg = load_checkpoint_model(ckpt)
    gen = Generator.from_model(
        model,
        tok,
        image_mean=model_cfg.vision.image_mean,
        image_std=model_cfg.vision.image_std,
        max_new_tokens=4,
    )
    questions = read_questions(data / "test_questions.jsonl")
    answer_file(gen, questions, data / "images", answers, model_id=role, batch_size=batch_size)
    task = EasyVQATask()
    scores = task.score(read_predictions(answers), task.load(data / "test_answers.json"))
    return {"parameters": count_parameters(model), "llm_parameters": count_parameters(model.llm), **scores}


def run_demo(
    run: Path,
    overrides: list[str],
    redo: bool = False,
    quick: bool = False,
    teacher_dir: Path | None = None,
    teacher_overrides: list[str] | None = None,
) -> dict:
    """The whole demo into ``run``; ``teacher_dir`` reuses (or trains into) a teacher elsewhere.

    ``overrides`` apply to every stage, ``teacher_overrides`` to the teacher's stages only (after them).
    """
    from mllm_kd.data_prep.easyvqa import prepare_easyvqa

    started = time.perf_counter()
    marks_before = _work_marks(run, teacher_dir)
    if quick:
        overrides = QUICK + overrides
        prepare_easyvqa(run / "data", max_train_images=64, max_test_questions=120, log=log.info)
    else:
        prepare_easyvqa(run / "data", log=log.info)
    results = {}
    for role in ROLES:
        role_overrides = overrides + (teacher_overrides or []) if role == "teacher" else overrides
        ckpt, seconds, stages = train_role(run, role, role_overrides, redo, teacher_dir)
        results[role] = {"checkpoint": str(ckpt), "train_seconds": round(seconds, 1), "stages": stages}
    for role in ROLES:
        answers = run / "eval" / f"{role}.answers.jsonl"
        results[role].update(evaluate(run / "data", answers, role, Path(results[role]["checkpoint"]), redo))
        results[role]["accuracy"] = results[role]["accuracy"] / 100.0
        log.info("%s: accuracy %.4f %s", role, results[role]["accuracy"], results[role]["by_type"])
    wall = time.perf_counter() - started
    # "seconds": the time spent producing these results, over every invocation that did some of the
    # work; a re-run that only finds finished stages and answers keeps the earlier total.
    previous = _previous_seconds(run)
    did_work = _work_marks(run, teacher_dir) != marks_before or previous is None
    results["seconds"] = round((previous or 0.0) + wall if did_work else previous, 1)
    results["wall_seconds"] = round(wall, 1)
    results["overrides"] = overrides
    write_report(run, results)
    return results


def _work_marks(run: Path, teacher_dir: Path | None) -> list[tuple[str, int]]:
    """(path, mtime) of everything the demo writes as a result: changes iff some work was done."""
    paths = [run / "data" / "manifest.json", *(run / "eval").glob("*.answers.jsonl")]
    for root in {run, teacher_dir or run / "teacher"}:
        paths += root.glob("**/final/trainer_state.json")
    return sorted((str(p), p.stat().st_mtime_ns) for p in paths if p.is_file())


def _previous_seconds(run: Path) -> float | None:
    try:
        return float(json.loads((run / "report.json").read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _loss_curves(run: Path, results: dict) -> dict[str, list[dict]]:
    curves = {}
    for role, (sub, stages, _, _) in ROLES.items():
        for stage in stages:
            path = run / sub / stage / "metrics.jsonl"
            if path.exists():
                curves[f"{role}/{stage}"] = [json.loads(ln) for ln in path.read_text().splitlines() if ln]
    return curves


def write_report(run: Path, results: dict) -> None:
    """report.json, report.md, loss_curves.png and accuracy.png in ``run``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = list(ROLES)
    (run / "report.json").write_text(json.dumps(results, indent=2))
    curves = _loss_curves(run, results)
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3), squeeze=False)
    for ax, (name, rows) in zip(axes[0], curves.items()):
        for term in ("loss", "ce", "mdist_resp", "mdist_vis", "rdist"):
            if rows and term in rows[0]:
                ax.plot([r["step"] for r in rows], [r.get(term) for r in rows], label=term, linewidth=1)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(run / "loss_curves.png", dpi=110)
    plt.close(fig)
    types = sorted(results["teacher"]["by_type"])
    fig, ax = plt.subplots(figsize=(6, 3))
    width = 0.8 / len(roles)
    for i, role in enumerate(roles):
        vals = [results[role]["accuracy"] * 100] + [results[role]["by_type"][t] for t in types]
        ax.bar([x + i * width for x in range(len(vals))], vals, width, label=role)
    ax.set_xticks([x + width for x in range(len(types) + 1)], ["overall", *types])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run / "accuracy.png", dpi=110)
    plt.close(fig)
    lines = [
        "# easy-VQA: teacher, plain student, LLaVA-KD student",
        "",
        f"Test split: {results['teacher']['n']} questions. Total time {results['seconds']:.0f} s "
        f"(this invocation {results['wall_seconds']:.0f} s).",
        "",
        "| model | parameters (LLM) | accuracy | " + " | ".join(types) + " | training time (s) | stages |",
        "|---|---|---|" + "---|" * len(types) + "---|---|",
    ]
    for role in roles:
        r = results[role]
        lines.append(
            f"| {role} | {r['parameters'] / 1e6:.2f}M ({r['llm_parameters'] / 1e6:.2f}M) | {100 * r['accuracy']:.2f} | "
            + " | ".join(f"{r['by_type'][t]:.2f}" for t in types)
            + f" | {r['train_seconds']:.0f} | {' -> '.join(r['stages'])} |"
        )
    gain = 100 * (results["student_kd"]["accuracy"] - results["student_baseline"]["accuracy"])
    lines += [
        "",
        f"LLaVA-KD gain over the plain student: {gain:+.2f} points.",
        "",
        "![loss curves](loss_curves.png)",
        "",
        "![accuracy](accuracy.png)",
        "",
    ]
    (run / "report.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mllm_kd.demo", description="easy-VQA: teacher -> plain and LLaVA-KD students"
    )
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--seed", type=int, default=0, help="seed of the students' stages (train.seed)")
    p.add_argument("--teacher-seed", type=int, default=0, help="seed of the teacher's stages")
    p.add_argument(
        "--teacher-dir",
        type=Path,
        default=None,
        help="where the teacher's stages live (default RUN/teacher); a finished teacher there is reused, "
        "so several student seeds can share one teacher",
    )
    p.add_argument("--redo", action="store_true", help="redo finished stages and evaluations")
    p.add_argument(
        "--quick", action="store_true", help="tiny models, a few hundred examples (the tests' variant)"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    setup_logging()
    run = Path(args.run_dir)
    try:
        results = run_demo(
            run,
            [f"train.seed={args.seed}", *args.overrides],
            redo=args.redo,
            quick=args.quick,
            teacher_dir=args.teacher_dir,
            teacher_overrides=[f"train.seed={args.teacher_seed}"],
        )
    except MllmKdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((run / "report.md").read_text())
    print(json.dumps({k: results[k]["accuracy"] for k in ROLES} | {"seconds": results["seconds"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
