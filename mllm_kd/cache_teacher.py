"""`python -m mllm_kd.cache_teacher --config FILE [--stage stage3] [key=value ...]`: cache a teacher's outputs.

Runs the stage's frozen teacher once over the stage's data (index order) and writes what the distillation
losses need to ``teacher.cache`` (or ``--out``); then run the stage with the same overrides plus
``teacher.cache=DIR`` and no teacher is loaded:

    python -m mllm_kd.cache_teacher --config configs/smoke.yaml --stage stage3 run_dir=runs/smoke \\
        teacher.cache=runs/smoke/teacher_cache/stage3
    python -m mllm_kd.stage3 --config configs/smoke.yaml run_dir=runs/smoke \\
        teacher.cache=runs/smoke/teacher_cache/stage3

With ``loss.cross_tokenizer=true`` the cache holds the teacher's rows at its own aligned and pooled
positions (:mod:`mllm_kd.teacher.cache_cross`, docs/cross-tokenizer.md). See
:mod:`mllm_kd.teacher.cache_format` for the format and :mod:`mllm_kd.losses.cached` for the loss. Prints a
JSON summary (sizes, bytes per distilled token) as its last line.
"""

from __future__ import annotations

import json
from pathlib import Path

from mllm_kd.cli import setup_process, stage_config
from mllm_kd.errors import ArgumentParser, ConfigError, MllmKdError, exit_code


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m mllm_kd.cache_teacher", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a YAML recipe (see configs/)")
    p.add_argument("--stage", default="stage3", choices=("stage1", "stage3"), help="whose data to cache")
    p.add_argument("--out", help="the cache directory (default: teacher.cache)")
    p.add_argument("--batch-size", type=int, help="samples per teacher forward (default: train.batch_size)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: train.device)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for the stage")
    args = p.parse_intermixed_args(argv)  # overrides before and after options
    setup_process()
    from mllm_kd.teacher.build import build_teacher_cache, describe
    from mllm_kd.teacher.cache_format import MANIFEST

    try:
        if args.batch_size is not None and args.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
        cfg = stage_config(args.config, args.stage, args.overrides)
        out = args.out or cfg.teacher.cache
        if not out:
            raise ConfigError("say where to write the cache: teacher.cache=DIR (or --out DIR)")
        if not cfg.teacher.checkpoint:
            raise ConfigError("the cache is built by running the teacher: set teacher.checkpoint")
        if (Path(out) / MANIFEST).exists() and not args.overwrite:
            raise ConfigError(f"{out} already holds a teacher cache; --overwrite replaces it")
        manifest = build_teacher_cache(cfg, out, batch_size=args.batch_size, device=args.device)
    except MllmKdError as e:
        return exit_code(e)
    print(json.dumps({"cache": str(out), **describe(manifest)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
