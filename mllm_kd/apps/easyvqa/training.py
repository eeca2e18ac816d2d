"""Training one model of the demo: a role's stages in order (roles.py says which, with which overrides),
with the compute-matched students' step count, the run's transfer set as the DFT's data, and the teacher cache
its DPT and DFT read. demo.py runs the roles; ablate.py trains its own variants."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from mllm_kd.apps.easyvqa.roles import ROLES, Recipe, role_dir, transfer_sized, transfer_suffix
from mllm_kd.apps.easyvqa.transfer import transfer_file
from mllm_kd.cli import stage_config
from mllm_kd.errors import ConfigError

log = logging.getLogger("mllm_kd.apps.easyvqa.demo")


def matched_overrides(
    recipe: Recipe, common: list[str], dft_questions: int | None = None, stage: str = "stage2"
) -> list[str]:
    """``stage`` (stage2: SFT; stage3: DFT's loss in one run) for as many optimizer steps as stage2 + stage3
    over the students' SFT questions (same data and batch); ``dft_questions``: stage3 on that many questions
    instead (a transfer set), a whole multiple of stage3's."""
    return [f"stages.{stage}.train.epochs={matched_epochs(recipe, common, dft_questions)}"]


def matched_epochs(recipe: Recipe, common: list[str], dft_questions: int | None = None) -> int:
    """The epochs of the students' SFT questions that take as many optimizer steps as stage2 + stage3 (the
    compute-matched count; :func:`matched_overrides`); refused unless both stages have the same data and batch."""
    sft, dft = (stage_config(recipe.config, s, common) for s in ("stage2", "stage3"))
    for what, a, b in (
        ("batch", sft.train.batch_size * sft.train.grad_accum, dft.train.batch_size * dft.train.grad_accum),
        ("data", (sft.data.path, sft.data.max_samples), (dft.data.path, dft.data.max_samples)),
    ):
        if a != b:
            raise ConfigError(
                f"the compute-matched student needs stage2 and stage3 with the same {what}: {a} vs {b}"
            )
    if sft.train.max_steps is not None or dft.train.max_steps is not None:
        raise ConfigError("the compute-matched student counts epochs; unset train.max_steps of stage2/stage3")
    times = 1
    if dft_questions is not None:
        if dft.data.max_samples is None or dft_questions % dft.data.max_samples:
            raise ConfigError(
                f"--transfer-questions {dft_questions}: the compute-matched student at that compute trains "
                f"epochs of the students' {dft.data.max_samples} questions, so it must be a multiple of them"
            )
        times = dft_questions // dft.data.max_samples
    return sft.train.epochs + times * dft.train.epochs


def transfer_size(recipe: Recipe, common: list[str], asked: int | None) -> int | None:
    """The run's transfer set, in questions (``--transfer-questions``; None or 0: none, DFT on the students'
    SFT questions as LLaVA-KD). A size the compute-matched student cannot match is refused here, before any
    work."""
    if asked is not None and asked < 0:
        raise ConfigError(f"--transfer-questions must be >= 0, got {asked}")
    if not asked:
        return None
    matched_overrides(recipe, common, asked)
    return asked


def teacher_cache(cfg, directory: Path) -> tuple[Path, float]:
    """The teacher's outputs over stage ``cfg``'s data, cached in ``directory`` (``cache_teacher``'s format):
    built on first use (one teacher pass), then shared by every seed and re-run; rebuilt when the teacher
    checkpoint or the stage's data changed since, or the stage needs projected images the cache lacks.
    Returns it and the seconds spent building."""
    from mllm_kd.teacher.build import build_teacher_cache
    from mllm_kd.teacher.cache import built_from

    if built_from(directory, cfg):
        return directory, 0.0
    if directory.exists():
        log.info(
            "teacher cache %s: built for another teacher or other data, or without the projected images "
            "this stage needs; rebuilding it",
            directory,
        )
    log.info("== teacher cache for %s -> %s", cfg.stage, directory)
    started = time.perf_counter()
    build_teacher_cache(cfg, directory, progress=cfg.train.progress)
    return directory, time.perf_counter() - started


def train_role(
    run: Path,
    recipe: Recipe,
    role: str,
    overrides: list[str],
    redo: bool,
    teacher_dir: Path,
    seed: int,
    sub: str | None = None,
    transfer_questions: int | None = None,
) -> tuple[Path, float, list[str]]:
    """Train one model's stages; returns its final checkpoint, the training seconds (with building the
    teacher cache where this role built it), and the stages.

    ``sub``: a student's directory under ``RUN/seed<s>`` other than its role's. ``transfer_questions``: the
    run's transfer set (:func:`transfer_size`; None: none), the DFT's data, which the compute-matched
    students count and which names the directories and teacher cache of the roles that depend on it."""
    from mllm_kd.stages import STAGES
    from mllm_kd.train.stage import stage_finished

    spec = ROLES[role]
    transfer = bool(transfer_questions) and transfer_sized(role)
    run_dir = teacher_dir if role == "teacher" else role_dir(run, role, seed, transfer_questions, sub)
    common = [
        f"run_dir={run_dir}",
        f"data_dir={run / 'data'}",
        f"teacher_dir={teacher_dir}",
        *spec.overrides,
        *overrides,
    ]
    seconds, stages = 0.0, list(spec.stages)
    if spec.starts_from is not None:
        role_from, stage_from = spec.starts_from
        earlier = ROLES[role_from]
        earlier_dir = role_dir(run, role_from, seed, transfer_questions)
        done = earlier.stages[: earlier.stages.index(stage_from) + 1]
        for stage in done:
            state = earlier_dir / stage / "final" / "trainer_state.json"
            seconds += json.loads(state.read_text())["elapsed"]
        common.append(f"stages.{spec.stages[0]}.init_from={earlier_dir / stage_from / 'final'}")
        stages = [*(f"{stage} (of {earlier_dir.name})" for stage in done), *stages]
    if transfer and "stage3" in spec.stages and not spec.one_run_dft:
        common += [
            f"stages.stage3.data.path={transfer_file(teacher_dir, transfer_questions)}",
            "stages.stage3.data.max_samples=null",
        ]
    if spec.teacher_projector:  # the first stage builds the student, with the teacher's projector
        first = spec.stages[0]
        projector = teacher_dir / "teacher_sft"
        common += [f"stages.{first}.init_from=null", f"stages.{first}.model.projector.checkpoint={projector}"]
        stages = [f"projector of {projector.parent.name}/{projector.name}", *stages]
    if spec.matched:  # its one stage trains the steps of stage2 + stage3
        common += matched_overrides(recipe, common, transfer_questions if transfer else None, spec.stages[-1])
    if redo:
        common.append("overwrite=true")
    ckpt = None
    for stage in spec.stages:
        cfg = stage_config(recipe.config, stage, common)
        # the cross-tokenizer student keeps its online teacher: its share of aligned positions is logged there
        if (
            stage in spec.cached_teacher
            and not cfg.loss.cross_tokenizer
            and (redo or not stage_finished(cfg))
        ):
            # one cache per data set
            name = (
                f"{stage}-transfer{transfer_suffix(transfer_questions)}"
                if transfer and stage == "stage3"
                else stage
            )
            cache, built = teacher_cache(cfg, teacher_dir / "cache" / name)
            seconds += built
            cfg = stage_config(recipe.config, stage, [*common, f"teacher.cache={cache}"])
        log.info("== %s (train.seed=%d): %s -> %s", role, cfg.train.seed, stage, cfg.output_dir)
        ckpt = STAGES[stage].run(cfg)
        seconds += json.loads((ckpt / "trainer_state.json").read_text())["elapsed"]
    assert ckpt is not None
    return ckpt, seconds, stages
