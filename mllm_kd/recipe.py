"""Recipes: a YAML file of a whole run read into the typed config of one stage, and the checks across sections.

A recipe file describes a whole run. Its top-level keys are the fields of
:class:`~mllm_kd.config.StageConfig` shared by every stage, plus a ``stages:`` mapping with one section per
stage (``teacher_pt``, ``teacher_sft``, ``stage1``, ``stage2``, ``stage3``) holding what differs. The config
of one stage is, from weakest to strongest::

    StageConfig defaults < the stage's built-in defaults (stages/) < recipe top level
        < recipe `stages.<name>` < command-line `key=value` overrides

Unknown keys are errors that name the key; ``${run_dir}``-style interpolations resolve last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mllm_kd.config import STAGE_NAMES, StageConfig
from mllm_kd.errors import ConfigError


def check_combinations(cfg: StageConfig, distills: bool) -> None:
    """Refuse options that contradict each other in stage ``cfg`` (``distills``: the stage has a teacher).

    Runs when the config is loaded (:func:`mllm_kd.cli.stage_config`) and again when the stage starts, so a
    contradiction is named before any model is built.
    """
    t, tr = cfg.train, cfg.trainable
    if (tr.vision, tr.projector, tr.llm) == ("frozen", "frozen", "frozen"):
        raise ConfigError(
            f"{cfg.stage}: trainable.vision, trainable.projector and trainable.llm are all frozen: nothing would train"
        )
    if cfg.init_from and cfg.model.projector.checkpoint:
        raise ConfigError(
            f"{cfg.stage}: model.projector.checkpoint initialises a freshly built model, but init_from="
            f"{cfg.init_from} loads a whole one; set it for a stage without init_from (stages.<name>.model...) "
            "or set init_from=null"
        )
    if cfg.lora.quantize and tr.llm != "lora":
        raise ConfigError(f"lora.quantize={cfg.lora.quantize} needs trainable.llm=lora, got {tr.llm!r}")
    if t.strategy == "fsdp2":
        if tr.llm == "lora":
            raise ConfigError(
                "trainable.llm=lora is not supported with train.strategy=fsdp2 (adapters are small: use ddp)"
            )
        if cfg.optim.name == "adamw8bit":
            raise ConfigError(
                "optim.name=adamw8bit does not support train.strategy=fsdp2 (a sharded student); use "
                "optim.name=adamw or train.strategy=ddp"
            )
    if not (distills and cfg.loss.distills):
        return
    teacher = cfg.teacher
    for key, what in (
        ("w_emb", "the teacher's projected images"),
        ("w_hidden", "the teacher's hidden states"),
    ):
        weight = getattr(cfg.loss, key)
        # a cache keeps the projected images where built with teacher.cache_projected_images (checked when
        # it is opened: mllm_kd/train/objective.py), never the hidden states
        cached = teacher.cache and key == "w_hidden"
        if weight > 0 and (cached or cfg.loss.cross_tokenizer):
            raise ConfigError(
                f"{cfg.stage}: loss.{key}={weight} distils {what}, which "
                + (
                    "a teacher cache does not store; use the online teacher (teacher.checkpoint)"
                    if cached
                    else "live in another embedding space with loss.cross_tokenizer=true"
                )
                + f" or loss.{key}=0"
            )
    if not teacher.checkpoint and not teacher.cache:
        raise ConfigError(
            f"{cfg.stage} distils but no teacher is configured: set teacher.checkpoint or teacher.cache "
            "(or loss.w_resp=0 loss.w_vis=0 loss.w_rel=0 loss.w_emb=0 loss.w_hidden=0 for no distillation)"
        )
    if teacher.cache:  # (teacher.quantize stays meaningful: it names the teacher the cache was built from)
        if cfg.loss.temperature != 1.0:
            raise ConfigError(
                f"loss.temperature={cfg.loss.temperature} with teacher.cache: the cache holds the teacher's "
                "log-probabilities at tau=1; use loss.temperature=1 or the online teacher (teacher.checkpoint)"
            )
    elif teacher.quantize and t.teacher_strategy == "fsdp2":
        raise ConfigError(
            "teacher.quantize cannot be combined with train.teacher_strategy=fsdp2 (bitsandbytes weights do "
            "not shard); a quantised teacher is small enough to replicate: use train.teacher_strategy=replicate"
        )


def _to_container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else node


def load_recipe(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        recipe = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry the line number
        raise ConfigError(f"cannot parse config file {path}: {e}") from e
    if not isinstance(recipe, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return recipe


def resolve_stage_config(
    recipe: DictConfig | dict,
    stage: str,
    stage_defaults: dict | None = None,
    overrides: list[str] | None = None,
    source: str = "<config>",
) -> StageConfig:
    """Build the typed config of one stage from a recipe (the order is in the module docstring).

    Args:
        recipe: the loaded YAML (top-level keys + optional ``stages`` mapping).
        stage: one of :data:`STAGE_NAMES`.
        stage_defaults: the stage recipe's own defaults (what it trains, which losses).
        overrides: ``key=value`` strings; ``stages.<name>.key=value`` targets one stage section.
        source: the file name, for error messages.
    """
    if stage not in STAGE_NAMES:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {STAGE_NAMES}")
    recipe = OmegaConf.create(_to_container(recipe))
    overrides = list(overrides or [])
    recipe_overrides = [o for o in overrides if o.startswith("stages.")]
    stage_overrides = [o for o in overrides if not o.startswith("stages.")]
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"command-line override {o!r} is not of the form key=value")
        try:
            OmegaConf.from_dotlist([o])
        except (yaml.YAMLError, OmegaConfBaseException) as e:
            raise ConfigError(f"command-line override {o!r}: the value is not valid YAML ({e})") from e
    try:
        if recipe_overrides:
            recipe = OmegaConf.merge(recipe, OmegaConf.from_dotlist(recipe_overrides))
        sections = recipe.pop("stages", None) or {}
        for name in sections:
            if name not in STAGE_NAMES:
                raise ConfigError(f"unknown stage section stages.{name}; expected one of {STAGE_NAMES}")
        section = sections.get(stage) or {}
        schema = OmegaConf.structured(StageConfig)
        merged = OmegaConf.merge(
            schema,
            stage_defaults or {},
            recipe,
            section,
            OmegaConf.from_dotlist(stage_overrides),
            {"stage": stage},
        )
        if not merged.output_dir:
            merged.output_dir = "${run_dir}/" + stage
        OmegaConf.resolve(merged)
        cfg = OmegaConf.to_object(merged)
    except ConfigError as e:
        raise ConfigError(f"{source} (stage {stage}): {e}") from e
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(
            f"{source}: invalid config for stage {stage}"
            + (f" at key {key!r}" if key else "")
            + f": {str(getattr(e, 'msg', e)).splitlines()[0]}"
        ) from e
    assert isinstance(cfg, StageConfig)
    return cfg
