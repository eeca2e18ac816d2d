"""Recipes: every YAML loads, overrides and precedence work, bad keys are named."""

from pathlib import Path

import pytest

from mllm_kd.cli import stage_config
from mllm_kd.config import STAGE_NAMES
from mllm_kd.errors import ConfigError
from mllm_kd.recipe import resolve_stage_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert any(p.name == "smoke.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_resolves_for_every_stage(path, tmp_path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "python -m mllm_kd" in first, (
        f"{path.name} must start with the command that runs it"
    )
    for stage in STAGE_NAMES:
        cfg = stage_config(path, stage, [f"run_dir={tmp_path}"])
        assert cfg.stage == stage
        assert cfg.output_dir == f"{tmp_path}/{stage}"
        assert "${" not in str(cfg)


def test_stage_defaults_and_precedence(tmp_path):
    smoke = ROOT / "configs" / "smoke.yaml"
    s1 = stage_config(smoke, "stage1", [f"run_dir={tmp_path}"])
    s2 = stage_config(smoke, "stage2", [f"run_dir={tmp_path}"])
    assert s1.optim.lr == 1e-3 and s1.data.template == "caption"  # stage1's built-in defaults
    assert (s1.trainable.projector, s1.trainable.llm) == ("full", "frozen")
    assert (s2.trainable.projector, s2.trainable.llm) == ("full", "full")
    assert s2.init_from == f"{tmp_path}/stage1"
    assert s1.data.path == f"{tmp_path}/data/captions.json"  # ${data_dir} interpolation
    # command line beats the recipe's stage section, which beats its top level
    s2o = stage_config(smoke, "stage2", [f"run_dir={tmp_path}", "optim.lr=0.5", "loss.w_rel=0"])
    assert s2o.optim.lr == 0.5 and s2o.loss.w_rel == 0
    s3 = stage_config(smoke, "stage3", [f"run_dir={tmp_path}", "stages.stage3.train.batch_size=3"])
    assert s3.train.batch_size == 3


def test_recipe_precedence_in_memory():
    recipe = {"optim": {"lr": 0.1}, "stages": {"stage2": {"optim": {"lr": 0.2}}}}
    defaults = {"optim": {"lr": 0.01}, "train": {"batch_size": 7}}
    assert resolve_stage_config(recipe, "stage1", defaults).optim.lr == 0.1
    assert resolve_stage_config(recipe, "stage2", defaults).optim.lr == 0.2
    assert resolve_stage_config(recipe, "stage2", defaults, ["optim.lr=0.3"]).optim.lr == 0.3
    assert resolve_stage_config(recipe, "stage2", defaults).train.batch_size == 7


@pytest.mark.parametrize(
    "recipe, overrides, key",
    [
        ({"loss": {"w_foo": 1}}, [], "w_foo"),
        ({"stages": {"stage1": {"optim": {"lrr": 1}}}}, [], "lrr"),
        ({}, ["train.batchsize=2"], "batchsize"),
        ({"stages": {"stage9": {}}}, [], "stage9"),
    ],
)
def test_unknown_keys_are_named(recipe, overrides, key):
    with pytest.raises(ConfigError, match=key):
        resolve_stage_config(recipe, "stage1", {}, overrides, source="x.yaml")


@pytest.mark.parametrize(
    "override, match",
    [
        ("loss.kind=kl", "loss.kind"),
        ("data.format=csv", "data.format"),
        ("trainable.llm=qlora", "trainable.llm"),
        ("model.projector.type=mlp_relu", "projector.type"),
        ("train.batch_size=abc", "batch_size"),
        ("noequals", "key=value"),
    ],
)
def test_invalid_values_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        resolve_stage_config({}, "stage1", {}, [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        stage_config(tmp_path / "nope.yaml", "stage1")
