"""What the demo trains: the recipes (configs and their quick variants) and the roles, i.e. which stages
each model runs with which overrides. Definitions only; demo.py runs them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mllm_kd.apps.easyvqa.report import EMB_ROLES, SEQKD_ROLES, STUDENT_ROLES, TPROJ_ROLES
from mllm_kd.configs import config_path
from mllm_kd.errors import ConfigError

NO_DISTILL = ["loss.w_resp=0", "loss.w_vis=0", "loss.w_rel=0"]


@dataclass(frozen=True)
class Recipe:
    config: Path
    prepare: dict  # prepare_easyvqa keyword arguments (quick runs shrink them)
    pretrained_weights: bool  # needs RUN/models (SmolLM2 + MobileNetV2)
    quick: tuple[str, ...]  # overrides of the tests' tiny variant
    teacher_seed: int = 0  # train.seed of the teachers' stages (``--teacher-seed`` overrides it)
    # whether the teacher's projector fits the student (the same tower and LLM embedding space): the
    # students that start from it (TPROJ_ROLES) or distil its projected images (EMB_ROLES) can run
    teacher_projector: bool = False


QUICK_SCRATCH = (
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
)
# The pretrained recipe's shape with tiny random parts: a random MobileNetV2 and a 3-layer Llama whose
# layers 0 and 2 make the student (the real weights are not needed to test the pipeline).
_TINY_LLAMA = (
    "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 3, "
    "num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 256, tie_word_embeddings: true}"
)
QUICK_PRETRAINED = (
    "teacher.model.vision.path=null",
    f"teacher.model.llm={{path: null, config: {_TINY_LLAMA}}}",
    f"model.llm={{path: null, keep_layers: [0, 2], config: {_TINY_LLAMA}}}",
    "teacher.model.tokenizer=${data_dir}/tokenizer",
    "model.tokenizer=${data_dir}/tokenizer",
    "train.batch_size=8",
    *(f"stages.{s}.data.max_samples=48" for s in ("teacher_pt", "teacher_sft", "stage1", "stage2", "stage3")),
)
RECIPES = {
    "pretrained": Recipe(
        config_path("easyvqa.yaml"),
        # a validation split for choosing hyper-parameters; records in a seeded random order, so the
        # recipe's first N questions cover ~N images (in image order they cover N / 9.6); yes/no answers
        # described and checked ("blue rectangle, red absent, yes"): chosen on the validation split, where
        # the teacher went from 82.31 (one word) to 90.95 (described) to 99.18 (checked) (docs/demo.md)
        {
            "val_images": 200,
            "test_sample": 3000,
            "shuffle": True,
            "describe_yes_no": True,
            "check_yes_no": True,
        },
        True,
        QUICK_PRETRAINED,
        # chosen on the validation split: seeds 0 and 1 differ by 49 points of colour (docs/demo.md)
        teacher_seed=1,
        teacher_projector=True,  # same frozen tower, same LLM width
    ),
    "scratch": Recipe(config_path("easyvqa_scratch.yaml"), {}, False, QUICK_SCRATCH),
}
QUICK_PREPARE = {"max_train_images": 64, "max_test_questions": 120}


@dataclass(frozen=True)
class Role:
    sub: str  # run directory under RUN (students: under RUN/seed<s>)
    stages: tuple[str, ...]
    overrides: tuple[str, ...]
    # (role, stage): continue that role's result of that stage (same config and seed) instead of training
    # the stages up to it again; this role's own stages follow it
    starts_from: tuple[str, str] | None = None
    # its one stage (stage2, or stage3 for DFT's loss in one run) for as many optimizer steps as stage2 + stage3
    # over the students' SFT questions: compute-matched
    matched: bool = False
    # no stage 1: the first stage builds the student with the teacher's trained projector (model.projector.checkpoint)
    teacher_projector: bool = False
    # stages whose teacher is read from the run's teacher cache (TEACHER/cache/<stage>, built by the first
    # seed that needs it, reused by the others and by re-runs) instead of running the teacher each time
    cached_teacher: tuple[str, ...] = ()
    # needs the run's transfer set (its stage 3 is a control on the teacher's answers)
    needs_transfer: bool = False

    @property
    def one_run_dft(self) -> bool:
        """DFT's loss for the steps of SFT + DFT in one stage 3 over the students' SFT questions: a run whose DFT
        reads a transfer set has no such DFT to match, so the role is not trained there."""
        return self.matched and self.stages[-1] == "stage3"


ROLES = {
    "teacher": Role("teacher", ("teacher_pt", "teacher_sft"), ()),
    "student_baseline": Role("baseline", ("stage1", "stage2"), tuple(NO_DISTILL)),
    "student_matched": Role(
        "matched", ("stage2",), tuple(NO_DISTILL), starts_from=("student_baseline", "stage1"), matched=True
    ),
    "student_kd": Role("kd", ("stage1", "stage2", "stage3"), (), cached_teacher=("stage1", "stage3")),
    "student_matched_tproj": Role(
        "matched_tproj", ("stage2",), tuple(NO_DISTILL), matched=True, teacher_projector=True
    ),
    "student_kd_tproj": Role(
        "kd_tproj", ("stage2", "stage3"), (), teacher_projector=True, cached_teacher=("stage3",)
    ),
    # matched_tproj with DFT's loss (CE + every term) in place of SFT's: the teacher's terms on one unbroken
    # schedule, where kd_tproj restarts warm-up and decay at stage 3
    "student_dft_tproj": Role(
        "dft_tproj", ("stage3",), (), matched=True, teacher_projector=True, cached_teacher=("stage3",)
    ),
    # w_emb=30: with weight 1 the term stayed at 1.06-1.09 (no closer than a zero projector) over DPT's first
    # 14 steps while the other terms summed to 28-45 (training losses of the first measured run, docs/demo.md);
    # 30 starts it on the scale of their sum. Not tuned on the validation or the test split. The teacher
    # cache keeps the projected images (teacher.cache_projected_images in the recipe), so it serves kd_emb too.
    "student_kd_emb": Role(
        "kd_emb",
        ("stage1", "stage2", "stage3"),
        ("stages.stage1.loss.w_emb=30", "stages.stage3.loss.w_emb=30"),
        cached_teacher=("stage1", "stage3"),
    ),
    # the control of a run with a transfer set: LLaVA-KD's DPT and SFT (the kd student's), then stage 3 on the
    # same teacher answers without the distillation terms (CE only: sequence-level KD)
    "student_seqkd_transfer": Role(
        "seqkd_transfer",
        ("stage3",),
        tuple(NO_DISTILL),
        starts_from=("student_kd", "stage2"),
        needs_transfer=True,
    ),
}
STUDENTS = [*STUDENT_ROLES, *TPROJ_ROLES, *EMB_ROLES, *SEQKD_ROLES]


def transfer_suffix(count: int | None) -> str:
    """What names a run's transfer set of ``count`` questions (its file, teacher cache, students and answers)
    apart from another size's; none without one."""
    return f"-{count}" if count else ""


def role_dir(run: Path, role: str, seed: int, transfer_questions: int | None, sub: str | None = None) -> Path:
    """A student's directory, ``RUN/seed<s>/<sub>``, named by the run's transfer set where the role depends
    on it (so that finished stages of a run with another DFT data set are never reused)."""
    suffix = transfer_suffix(transfer_questions) if transfer_sized(role) else ""
    return run / f"seed{seed}" / f"{sub or ROLES[role].sub}{suffix}"


def transfer_sized(role: str) -> bool:
    """Whether ``role`` depends on the run's transfer set (it has a DFT, or counts one's steps), so that in a
    run with one its directory and answers are named by the set's size."""
    spec = ROLES[role]
    return role != "teacher" and ("stage3" in spec.stages or spec.matched)


assert set(ROLES) == {"teacher", *STUDENTS}


def recipe_students(
    recipe: Recipe,
    teacher_projector: bool = False,
    projected_images: bool = False,
    seqkd: bool = False,
    transfer_questions: int | None = None,
    only: tuple[str, ...] | None = None,
) -> list[str]:
    """The student roles to train: the comparison fixed in advance; with ``teacher_projector`` the ones that
    start from the teacher's projector (without a :attr:`Role.one_run_dft` one where the DFT reads a transfer set), with
    ``projected_images`` the one that distils its projected images (ConfigError where the recipe's teacher
    projector does not fit the student), with ``seqkd`` the control on the transfer set of ``transfer_questions``
    (ConfigError without one). ``only`` (``--students``): these roles instead (``student_`` optional), in the
    report's order, under the same checks; a role that one of them continues (``Role.starts_from``) must be named
    too (ConfigError)."""
    if only is not None:
        if teacher_projector or projected_images or seqkd:
            raise ConfigError(
                "--students names the students itself: drop --teacher-projector, --projected-images and --seqkd"
            )
        roles = [_student_role(name) for name in only]
        teacher_projector = any(r in TPROJ_ROLES for r in roles)
        projected_images = any(r in EMB_ROLES for r in roles)
    for asked, option in (
        (teacher_projector, "--teacher-projector"),
        (projected_images, "--projected-images"),
    ):
        if asked and not recipe.teacher_projector:
            raise ConfigError(
                f"{option}: the {recipe.config.name} teacher's projector does not fit its student "
                "(another vision tower or LLM width)"
            )
    if only is None:
        tproj = tuple(r for r in TPROJ_ROLES if not (transfer_questions and ROLES[r].one_run_dft))
        roles = [
            *STUDENT_ROLES,
            *(tproj if teacher_projector else ()),
            *(EMB_ROLES if projected_images else ()),
            *(SEQKD_ROLES if seqkd else ()),
        ]
    else:
        for role in roles:
            if transfer_questions and ROLES[role].one_run_dft:
                raise ConfigError(
                    f"--students {ROLES[role].sub}: its one DFT run is over the students' SFT questions; a run "
                    "whose DFT reads a transfer set has no such DFT to match"
                )
            earlier = ROLES[role].starts_from
            if earlier is not None and earlier[0] not in roles:
                raise ConfigError(
                    f"--students {ROLES[role].sub}: it continues {ROLES[earlier[0]].sub}'s {earlier[1]}; "
                    f"name {ROLES[earlier[0]].sub} too"
                )
        roles = [r for r in STUDENTS if r in roles]
    if not transfer_questions and any(ROLES[r].needs_transfer for r in roles):
        raise ConfigError(
            "--seqkd trains on the run's transfer set, and this run has none: add --transfer-questions N"
        )
    return roles


def _student_role(name: str) -> str:
    """A ``--students`` name (``dft_tproj`` or ``student_dft_tproj``) as its role; ConfigError names the others."""
    role = name if name.startswith("student_") else f"student_{name}"
    if role not in STUDENTS:
        known = ", ".join(r.removeprefix("student_") for r in STUDENTS)
        raise ConfigError(f"--students: no student role {name!r}; the roles are {known}")
    return role
