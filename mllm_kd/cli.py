"""Command-line entry points: ``python -m mllm_kd.stageN --config FILE [key=value ...]`` and friends."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mllm_kd.config import StageConfig
from mllm_kd.errors import ArgumentParser, ConfigError, MllmKdError, exit_code
from mllm_kd.recipe import check_combinations, load_recipe, resolve_stage_config
from mllm_kd.runtime.allocator import reuse_freed_memory
from mllm_kd.runtime.preemption import PREEMPTED_EXIT, Preempted
from mllm_kd.stages import STAGES


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def setup_process() -> None:
    """What every command-line entry point runs first: logging, and glibc's allocator set to keep freed large
    blocks for reuse (:mod:`mllm_kd.runtime.allocator`; ``MLLM_KD_MALLOC=default`` keeps its defaults)."""
    setup_logging()
    reuse_freed_memory()


def stage_config(config: str | Path, stage: str, overrides: list[str] | None = None) -> StageConfig:
    """The resolved config of one stage of a recipe file, its values and their combination checked."""
    cfg = resolve_stage_config(
        load_recipe(config), stage, STAGES[stage].defaults, overrides, source=str(config)
    )
    try:
        check_combinations(cfg, STAGES[stage].distills)
    except ConfigError as e:
        raise ConfigError(f"{config} (stage {stage}): {e}") from e
    return cfg


def run_stages(config: str | Path, stages: list[str], overrides: list[str] | None = None) -> list[Path]:
    """Run stages in order (each skipped when already finished); returns their checkpoint directories."""
    cfgs = [stage_config(config, s, overrides) for s in stages]  # every config checked before any training
    return [STAGES[c.stage].run(c) for c in cfgs]


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help="a YAML recipe (see configs/)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. run_dir=runs/x loss.w_rel=0"
    )
    return p


def main(stages: list[str], prog: str, description: str, argv: list[str] | None = None) -> int:
    args = _parser(prog, description).parse_intermixed_args(argv)  # overrides around --config
    setup_process()
    try:
        for path in run_stages(args.config, stages, args.overrides):
            print(f"finished: {path}")
    except MllmKdError as e:
        return exit_code(e)
    except Preempted as e:  # a step checkpoint is written: re-running the same command resumes
        print(f"preempted: {e}; exit status {PREEMPTED_EXIT}", file=sys.stderr)
        return PREEMPTED_EXIT
    return 0
