"""The main job: easy-VQA, from teacher to distilled student, in one command: every phase of the job, in
the order it runs. What each model is (recipes, roles) is in roles.py, how one is trained in training.py, the
transfer set in transfer.py, the report in report.py, the phase timer in phases.py.

    python -m mllm_kd.apps.easyvqa.demo [--run-dir runs/demo] [--recipe pretrained|scratch] [--seeds 0,1]
                           [--split test|val] [--questions N] [--captions N] [--student-questions N]
                           [--teacher-dir DIR]
                           [--teacher-llm gemma3-270m] [--teacher-projector] [--projected-images]
                           [--transfer-questions N] [--seqkd] [--students ROLE,...]
                           [--redo] [--quick]
                           [key=value ...]

1. prepares easy-VQA (``RUN/data``) and, for the pretrained recipe, the offline weights (``RUN/models``:
   SmolLM2-135M-Instruct dequantised once from its GGUF file, torchvision's MobileNetV2 file);
2. trains the teacher (``RUN/teacher``: ``teacher_pt`` -> ``teacher_sft``);
3. with ``--transfer-questions N``, the transfer set: N training questions in no model's data, answered by
   the teacher (``TEACHER/transfer/transfer-N.json``), which then are the students' DFT data;
4. per student seed (``RUN/seed<s>/``), the three students of the comparison fixed in advance:
   ``baseline`` (plain PT -> SFT), ``matched`` (the same PT, then SFT for as many optimizer steps as
   SFT + DFT: the compute-matched plain student) and ``kd`` (LLaVA-KD: DPT -> SFT -> DFT; its DPT and DFT
   read the teacher's outputs from ``TEACHER/cache/<stage>``, one teacher pass per stage for all seeds);
5. answers the evaluation questions with every model (``RUN/eval/<split>/*.answers.jsonl``) and scores
   them: exact match overall and per question type, yes/no also against the template prior;
6. writes ``RUN/report.md``, ``RUN/report.json`` (per role: the mean over seeds, each seed, the spread)
   and PNG plots.

Recipes: ``pretrained`` (configs/easyvqa.yaml, the default: frozen ImageNet MobileNetV2, SmolLM2-135M
teacher, a 10-of-30-layer SmolLM2 student) and ``scratch`` (configs/easyvqa_scratch.yaml: every LLM
random, the teacher's vision tower trained from scratch; the control where distillation does not win).
``--split val`` scores the validation split carved from the training images (for choosing
hyper-parameters) instead of the test questions. Every step is skipped when its result exists
(``--redo`` redoes them). ``key=value`` overrides apply to every stage. ``--quick`` is the tests'
variant: a few hundred examples and tiny random models. ``--teacher-llm gemma3-270m`` also trains a teacher
with that LLM and the ``kd`` student taught by it across tokenizers (teachers.py), reported next to the others.
``--teacher-projector`` also trains ``matched_tproj`` and ``kd_tproj``: the compute-matched and LLaVA-KD
students with stage 1 replaced by the teacher's trained projector (``model.projector.checkpoint``), and
``dft_tproj``: ``matched_tproj`` with DFT's loss (CE + the teacher's terms) on the same one-run schedule (not
with a transfer set: its run is over the students' SFT questions).
``--transfer-questions N`` runs every DFT on N teacher-answered questions instead of the students' SFT questions
(a whole multiple of them; the compute-matched students train as many steps; the directories, caches and answers
of the students that depend on it are named by it: ``kd-N``, ``matched-N``). ``--seqkd`` also trains
``seqkd_transfer``, its control: ``kd``'s DPT and SFT, then stage 3 on the teacher's answers without the
distillation terms.
``--students dft_tproj,matched_tproj`` trains and scores only those students (with the teacher): more seeds of one
comparison at a third of the cost; the report then gives the gaps between the students it has.
``--projected-images`` also trains ``kd_emb``: LLaVA-KD with the teacher's projected images distilled in DPT
and DFT (``loss.w_emb=30``: the term's start on the scale of the others' sum in DPT; roles.py).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from mllm_kd.apps.easyvqa.options import add_size_options, seed_list, size_overrides
from mllm_kd.apps.easyvqa.phases import Phases
from mllm_kd.apps.easyvqa.report import gaps, other_roles, student_roles, summarise, write_report
from mllm_kd.apps.easyvqa.roles import (
    QUICK_PREPARE,
    RECIPES,
    ROLES,
    STUDENTS,
    recipe_students,
    role_dir,
    transfer_sized,
    transfer_suffix,
)
from mllm_kd.apps.easyvqa.scoring import evaluate
from mllm_kd.apps.easyvqa.teachers import STUDENT_OVERRIDES, TEACHER_LLMS, aligned_share
from mllm_kd.apps.easyvqa.training import train_role, transfer_size
from mllm_kd.apps.easyvqa.transfer import answer_transfer_set
from mllm_kd.cli import setup_process
from mllm_kd.errors import ArgumentParser, ConfigError, MllmKdError, exit_code
from mllm_kd.tracking import log_scores

log = logging.getLogger("mllm_kd.apps.easyvqa.demo")


def prepare_weights(models: Path) -> None:
    """``models/smollm2-135m-instruct`` (dequantised once) and a link to the MobileNetV2 weights file."""
    from mllm_kd.data_prep.weights import export_smollm2, require_file

    models.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    export_smollm2(models / "smollm2-135m-instruct")
    source = require_file("mobilenet_v2")
    link = models / source.name
    if link.is_symlink() and link.resolve() != source.resolve():
        link.unlink()  # a link into another (perhaps deleted) environment's copy
    if not link.exists():
        link.symlink_to(source)
    log.info("weights ready in %s (%.1f s)", models, time.perf_counter() - started)


def run_demo(
    run: Path,
    overrides: list[str],
    *,
    recipe: str = "pretrained",
    seeds: tuple[int, ...] = (0,),
    split: str = "test",
    redo: bool = False,
    quick: bool = False,
    teacher_dir: Path | None = None,
    teacher_overrides: list[str] | None = None,
    teacher_llm: str | None = None,
    teacher_projector: bool = False,
    projected_images: bool = False,
    transfer_questions: int | None = None,
    seqkd: bool = False,
    answers: str | None = None,
    students: tuple[str, ...] | None = None,
) -> dict:
    """The whole demo into ``run``; ``teacher_dir`` reuses (or trains into) a teacher elsewhere.

    ``overrides`` apply to every stage, ``teacher_overrides`` to the teacher's stages only (after them).
    ``teacher_llm`` (a key of :data:`TEACHER_LLMS`): also a teacher with that LLM and the ``kd`` student it
    teaches across tokenizers. ``teacher_projector``: also the compute-matched and LLaVA-KD students that
    start from the teacher's trained projector instead of stage 1 (:data:`TPROJ_ROLES`).
    ``projected_images``: also LLaVA-KD with the teacher's projected images distilled (:data:`EMB_ROLES`).
    ``transfer_questions``: the students' DFT on a transfer set of that many teacher-answered questions
    (:func:`transfer_size`; None or 0: none); ``seqkd``: also its control (:data:`SEQKD_ROLES`).
    ``answers``: every model's yes/no training answers, a key of :data:`ANSWER_FORMATS`: "described" says
    first what the image shows ("blue rectangle, yes"; ``data_prep.easyvqa --describe-yes-no``; scored on
    the last word), "checked" then what the question asks about ("blue rectangle, red absent, yes";
    ``--check-yes-no``), "one-word" is the label alone; None: the recipe's choice. ``students``: only these
    student roles (``--students``; :func:`recipe_students`), e.g. more seeds of two of them.
    """
    from mllm_kd.data_prep.easyvqa import prepare_easyvqa

    spec = RECIPES[recipe]
    overrides = [*(spec.quick if quick else ()), *(["train.progress=false"] if quick else []), *overrides]
    # before any work: refuses a misfit
    transfer_questions = transfer_size(spec, [f"data_dir={run / 'data'}", *overrides], transfer_questions)
    students = recipe_students(spec, teacher_projector, projected_images, seqkd, transfer_questions, students)
    other = TEACHER_LLMS[teacher_llm] if teacher_llm else None
    if other is not None and "student_kd" not in students:
        raise ConfigError("--teacher-llm compares its student with the kd one: add kd to --students")
    started = time.perf_counter()
    teacher_dir = teacher_dir or run / "teacher"
    marks_before = _work_marks(run, teacher_dir)
    prepare = {**spec.prepare, **(QUICK_PREPARE if quick else {})}
    if quick and "val_images" in prepare:
        prepare["val_images"], prepare["test_sample"] = 8, None
    if answers is not None:
        if answers not in ANSWER_FORMATS:
            raise ConfigError(f"answers must be one of {sorted(ANSWER_FORMATS)}, got {answers!r}")
        prepare = {k: v for k, v in prepare.items() if k not in ANSWER_FLAGS}
        prepare.update(ANSWER_FORMATS[answers])
    _check_answer_format(run, answer_format(prepare), redo)
    phases = Phases(log)
    with phases("data"):
        prepare_easyvqa(run / "data", log=log.info, **prepare)
    if spec.pretrained_weights and not quick:
        with phases("weights"):
            prepare_weights(run / "models")
    if other is not None:
        with phases(f"weights {other.name}"):
            other.prepare(run, quick)
    teacher_overrides = [f"train.seed={spec.teacher_seed}", *(teacher_overrides or [])]
    models: dict[str, dict] = {}  # "<role>" or "<role>/seed<s>" -> result
    answer_names: dict[str, str] = {}  # key -> its answers file's name, where not the key's
    with phases("teacher"):
        ckpt, seconds, stages = train_role(
            run, spec, "teacher", overrides + (teacher_overrides or []), redo, teacher_dir, seed=0
        )
    models["teacher"] = {"checkpoint": str(ckpt), "train_seconds": round(seconds, 1), "stages": stages}
    if transfer_questions:
        with phases("transfer set"):
            answer_transfer_set(run, spec, overrides, ckpt, teacher_dir, transfer_questions)
    if other is not None:
        other_overrides = [*overrides, *other.teacher_overrides(quick), *(teacher_overrides or [])]
        with phases(other.teacher_role):
            ckpt, seconds, stages = train_role(
                run, spec, "teacher", other_overrides, redo, other.teacher_dir(run), seed=0
            )
        models[other.teacher_role] = {
            "checkpoint": str(ckpt),
            "train_seconds": round(seconds, 1),
            "stages": stages,
        }
        if transfer_questions:  # its student's DFT reads its own teacher's answers
            with phases(f"transfer set {other.name}"):
                answer_transfer_set(
                    run, spec, other_overrides, ckpt, other.teacher_dir(run), transfer_questions
                )
    for seed in seeds:
        for role in students:
            seeded = [*overrides, f"train.seed={seed}"]
            with phases(f"{role}, seed {seed}"):
                ckpt, seconds, stages = train_role(
                    run, spec, role, seeded, redo, teacher_dir, seed, transfer_questions=transfer_questions
                )
            models[f"{role}/seed{seed}"] = {
                "checkpoint": str(ckpt),
                "train_seconds": round(seconds, 1),
                "stages": stages,
            }
            if transfer_questions and transfer_sized(role):  # not another DFT data set's answers
                answer_names[f"{role}/seed{seed}"] = f"{role}{transfer_suffix(transfer_questions)}-seed{seed}"
        if other is not None:
            seeded = [*overrides, f"train.seed={seed}", *STUDENT_OVERRIDES]
            with phases(f"{other.student_role}, seed {seed}"):
                ckpt, seconds, stages = train_role(
                    run,
                    spec,
                    "student_kd",
                    seeded,
                    redo,
                    other.teacher_dir(run),
                    seed,
                    sub=other.student_sub,
                    transfer_questions=transfer_questions,
                )
            if transfer_questions:
                name = f"{other.student_role}{transfer_suffix(transfer_questions)}-seed{seed}"
                answer_names[f"{other.student_role}/seed{seed}"] = name
            models[f"{other.student_role}/seed{seed}"] = {
                "checkpoint": str(ckpt),
                "train_seconds": round(seconds, 1),
                "stages": stages,
                "aligned": aligned_share(ckpt.parent.parent),
            }
    for key, result in models.items():
        answers = run / "eval" / split / f"{answer_names.get(key, key.replace('/', '-'))}.answers.jsonl"
        with phases(f"evaluate {key}"):
            result.update(evaluate(run / "data", split, answers, key, Path(result["checkpoint"]), redo))
        log_scores(result["checkpoint"], {"task": f"easyvqa_{split}", **result})  # trackers, if configured
        result["accuracy"] = result["accuracy"] / 100.0
        log.info("%s: accuracy %.4f %s", key, result["accuracy"], result["by_type"])
    results: dict = {"teacher": models["teacher"]}
    for role in students:
        results[role] = summarise({s: models[f"{role}/seed{s}"] for s in seeds})
    if other is not None:
        results[other.teacher_role] = models[other.teacher_role]
        results[other.student_role] = summarise({s: models[f"{other.student_role}/seed{s}"] for s in seeds})
        results["teacher_llm"] = other.name
    wall = time.perf_counter() - started
    # "seconds": the time spent producing these results, over every invocation that did some of the
    # work; a re-run that only finds finished stages and answers keeps the earlier total.
    previous = _previous_seconds(run)
    did_work = _work_marks(run, teacher_dir) != marks_before or previous is None
    results["seconds"] = round((previous or 0.0) + wall if did_work else previous, 1)
    results["wall_seconds"] = round(wall, 1)
    results.update(recipe=recipe, split=split, seeds=list(seeds), overrides=overrides)
    results["transfer_questions"] = transfer_questions
    results["gaps"] = gaps(results)
    if other is not None:
        delta = 100 * (results[other.student_role]["accuracy"] - results["student_kd"]["accuracy"])
        results["gaps"][f"{other.student_role}_minus_student_kd"] = round(delta, 2)
    results["phases"] = {name: round(dt, 1) for name, dt in phases.rows}  # this invocation's
    write_report(run, results, _loss_curves(run, results))
    log.info("the demo's phases in this invocation (finished work is skipped):\n%s", phases.table())
    return results


def _work_marks(run: Path, teacher_dir: Path) -> list[tuple[str, int]]:
    """(path, mtime) of everything the demo writes as a result: changes iff some work was done."""
    paths = [run / "data" / "manifest.json", *(run / "eval").glob("*/*.answers.jsonl")]
    for root in {run, teacher_dir}:
        paths += root.glob("**/final/trainer_state.json")
    return sorted((str(p), p.stat().st_mtime_ns) for p in paths if p.is_file())


def _previous_seconds(run: Path) -> float | None:
    try:
        return float(json.loads((run / "report.json").read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _loss_curves(run: Path, results: dict) -> dict[str, list[dict]]:
    curves = {}
    seed = results["seeds"][0]
    for role, spec in ROLES.items():
        if role != "teacher" and role not in results:
            continue
        base = (
            run / "teacher" if role == "teacher" else role_dir(run, role, seed, results["transfer_questions"])
        )
        for stage in spec.stages:
            path = base / stage / "metrics.jsonl"
            if path.exists():
                curves[f"{role}/{stage}"] = [json.loads(ln) for ln in path.read_text().splitlines() if ln]
    return curves


# --answers: the yes/no answer formats, as prepare_easyvqa's flags
ANSWER_FORMATS = {
    "one-word": {},
    "described": {"describe_yes_no": True},
    "checked": {"describe_yes_no": True, "check_yes_no": True},
}
ANSWER_FLAGS = ("describe_yes_no", "check_yes_no")


def answer_format(prepare_args: dict) -> str:
    """The answer format (a key of :data:`ANSWER_FORMATS`) of prepare_easyvqa's arguments or a manifest's."""
    flags = {k: True for k in ANSWER_FLAGS if prepare_args.get(k)}  # older manifests lack the keys
    return next(name for name, f in ANSWER_FORMATS.items() if f == flags)


def _check_answer_format(run: Path, answers: str, redo: bool) -> None:
    """Refuse a run directory whose models learned another answer format: finished stages are reused
    whatever the data they were trained on."""
    manifest = run / "data" / "manifest.json"
    if redo or not manifest.exists():
        return
    had = answer_format(json.loads(manifest.read_text()).get("args", {}))
    if had != answers:
        raise ConfigError(
            f"{run}: its data and models were made with {had} yes/no answers, not {answers}; use another "
            "--run-dir, or --redo to retrain everything"
        )


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m mllm_kd.apps.easyvqa.demo",
        description="easy-VQA: teacher -> plain, compute-matched and LLaVA-KD students",
    )
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="pretrained")
    p.add_argument(
        "--seeds", type=seed_list, default=(0, 1), help="the students' seeds (train.seed), e.g. 0,1"
    )
    p.add_argument("--teacher-seed", type=int, help="seed of the teacher's stages (default: the recipe's)")
    p.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="score the test questions, or the validation split held out from the train images "
        "(for choosing hyper-parameters)",
    )
    p.add_argument(
        "--teacher-dir",
        type=Path,
        default=None,
        help="where the teacher's stages live (default RUN/teacher); a finished teacher there is reused",
    )
    add_size_options(p)
    p.add_argument(
        "--teacher-llm",
        choices=sorted(TEACHER_LLMS),
        default=None,
        help="also a teacher with this LLM (another family) and the kd student it teaches across tokenizers",
    )
    p.add_argument(
        "--teacher-projector",
        action="store_true",
        help="also the compute-matched and LLaVA-KD students that start from the teacher's trained projector "
        "instead of stage 1, and the compute-matched one with DFT's loss (three students more per seed: about "
        "90-150 s training and 50-90 s answering each on 2 CPU cores)",
    )
    p.add_argument(
        "--projected-images",
        action="store_true",
        help="also the LLaVA-KD student that distils the teacher's projected images in DPT and DFT "
        "(loss.w_emb=30; about as long as the kd student)",
    )
    p.add_argument(
        "--transfer-questions",
        type=int,
        default=None,
        metavar="N",
        help="the students' DFT on N training questions in no model's data, answered by the teacher, instead of "
        "their SFT questions (a multiple of them; the compute-matched students train as many steps)",
    )
    p.add_argument(
        "--seqkd",
        action="store_true",
        help="also the control on the transfer set: LLaVA-KD's DPT and SFT, then the same DFT steps on the "
        "teacher's answers without the distillation terms",
    )
    p.add_argument(
        "--answers",
        choices=sorted(ANSWER_FORMATS),
        default=None,
        help='yes/no training answers: "described" says first what the image shows ("blue rectangle, '
        'yes"; scored on the last word), "checked" then what the question asks about ("blue rectangle, red '
        'absent, yes"), "one-word" is the label alone (default: the recipe\'s); a run directory holds one',
    )
    p.add_argument(
        "--students",
        type=lambda text: tuple(text.split(",")),
        default=None,
        metavar="ROLE,...",
        help="train and score only these students (and the teacher), e.g. dft_tproj,matched_tproj for more "
        "seeds of one comparison; roles: " + ", ".join(r.removeprefix("student_") for r in STUDENTS),
    )
    p.add_argument("--redo", action="store_true", help="redo finished stages and evaluations")
    p.add_argument(
        "--quick", action="store_true", help="tiny random models, a few hundred examples (the tests' variant)"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    setup_process()
    run = Path(args.run_dir)
    sizes = size_overrides(args.questions, args.captions, args.student_questions)
    try:
        results = run_demo(
            run,
            [*sizes, *args.overrides],
            recipe=args.recipe,
            seeds=args.seeds,
            split=args.split,
            redo=args.redo,
            quick=args.quick,
            teacher_dir=args.teacher_dir,
            teacher_overrides=[] if args.teacher_seed is None else [f"train.seed={args.teacher_seed}"],
            teacher_llm=args.teacher_llm,
            teacher_projector=args.teacher_projector,
            projected_images=args.projected_images,
            transfer_questions=args.transfer_questions,
            seqkd=args.seqkd,
            answers=args.answers,
            students=args.students,
        )
    except MllmKdError as e:
        return exit_code(e)
    print((run / "report.md").read_text())
    roles = ["teacher", *student_roles(results), *other_roles(results)]
    print(json.dumps({k: results[k]["accuracy"] for k in roles} | {"seconds": results["seconds"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
