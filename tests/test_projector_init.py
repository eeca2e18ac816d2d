"""``model.projector.checkpoint``: a freshly built student starts from another checkpoint's projector
(e.g. the teacher's), and refuses one that does not fit, naming the key."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import SMOKE
from omegaconf import OmegaConf
from safetensors import safe_open
from test_inputs_config import _fake_checkpoint, refused

from mllm_kd.checkpoint.native import WEIGHTS, build_from_config, read_model_config, resolve_checkpoint
from mllm_kd.cli import main as stage_main
from mllm_kd.config import ProjectorConfig
from mllm_kd.errors import ConfigError
from mllm_kd.model.tokenization import load_tokenizer


def _teacher(smoke_teacher):
    ckpt = resolve_checkpoint(smoke_teacher / "teacher_sft")
    with safe_open(str(ckpt / WEIGHTS), framework="pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return ckpt, read_model_config(ckpt), load_tokenizer(ckpt / "tokenizer"), weights


def test_fresh_model_takes_the_projector_and_nothing_else(smoke_teacher):
    ckpt, cfg, tok, weights = _teacher(smoke_teacher)
    cfg = replace(cfg, projector=ProjectorConfig(type=cfg.projector.type, checkpoint=str(ckpt)))
    torch.manual_seed(123)
    model = build_from_config(cfg, tok)
    own = model.state_dict()
    projector = [k for k in weights if k.startswith("projector.")]
    assert projector
    for k in projector:
        torch.testing.assert_close(own[k], weights[k], rtol=0, atol=0)
    # the LLM is the config's fresh random one, not the checkpoint's
    llm = [k for k in weights if k.startswith("llm.") and weights[k].dim() == 2]
    assert not torch.equal(own[llm[0]], weights[llm[0]])


@pytest.mark.parametrize("change", ["width", "type"])
def test_a_projector_that_does_not_fit_is_refused(smoke_teacher, change):
    ckpt, cfg, tok, _ = _teacher(smoke_teacher)
    if change == "width":
        llm = replace(cfg.llm, config={**cfg.llm.config, "hidden_size": 2 * cfg.llm.config["hidden_size"]})
        cfg = replace(cfg, llm=llm, projector=ProjectorConfig(type=cfg.projector.type, checkpoint=str(ckpt)))
        expected = "does not fit this model"
    else:
        cfg = replace(cfg, projector=ProjectorConfig(type="linear", checkpoint=str(ckpt)))
        expected = "projector, this model's is 'linear'"
    with pytest.raises(ConfigError, match=expected) as e:
        build_from_config(cfg, tok)
    assert f"model.projector.checkpoint={ckpt}" in str(e.value)


def test_stage_starts_from_the_teachers_projector_and_saves_no_path(smoke_teacher, tmp_path, capsys):
    """stage2 without init_from: built fresh (the smoke teacher's tower, LLM and projector shapes) with the
    teacher's projector; the checkpoint it writes stands alone (no path to the teacher in model.yaml)."""
    ckpt, _, _, weights = _teacher(smoke_teacher)
    run = tmp_path / "run"
    args = [
        "--config",
        str(SMOKE),
        f"run_dir={run}",
        f"data_dir={smoke_teacher}/data",
        f"model.vision.checkpoint={ckpt}",
        # the smoke student (1 layer) at the teacher's width, so that the teacher's projector fits
        "model.llm.config.hidden_size=64",
        "model.llm.config.intermediate_size=128",
        "model.llm.config.num_attention_heads=4",
        "model.llm.config.num_key_value_heads=2",
        "init_from=null",
        f"model.projector.checkpoint={ckpt}",
        "train.max_steps=1",
        "trainable.projector=frozen",  # so that the saved projector must equal the teacher's
    ]
    assert stage_main(["stage2"], "t", "t", args) == 0, capsys.readouterr().err
    saved = resolve_checkpoint(run / "stage2")
    assert OmegaConf.load(saved / "model.yaml").projector.checkpoint is None
    with safe_open(str(saved / WEIGHTS), framework="pt") as f:
        for k in (k for k in weights if k.startswith("projector.")):
            torch.testing.assert_close(f.get_tensor(k), weights[k], rtol=0, atol=0)


def test_projector_checkpoint_with_init_from_is_refused(capsys, tmp_path, smoke_data):
    line = refused(
        capsys,
        tmp_path,
        f"data_dir={smoke_data}/data",
        "model.projector.checkpoint=/some/teacher",
        stage="stage2",
    )
    assert "model.projector.checkpoint" in line and "init_from" in line


def test_missing_projector_checkpoint_is_named(capsys, tmp_path, smoke_data):
    vision = _fake_checkpoint(tmp_path / "tower")
    line = refused(
        capsys,
        tmp_path,
        f"data_dir={smoke_data}/data",
        f"model.vision.checkpoint={vision}",
        "model.projector.checkpoint=/nope/p",
        stage="stage1",
    )
    assert "model.projector.checkpoint /nope/p does not exist" in line
