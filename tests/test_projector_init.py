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


def _llm_from(cfg, ckpt, keep):
    return replace(cfg, llm=replace(cfg.llm, checkpoint=str(ckpt), keep_layers=keep))


def test_fresh_model_takes_the_checkpoints_llm_layers_in_keep_layers_order(smoke_teacher):
    """``model.llm.checkpoint`` with ``keep_layers=[1, 0]``: the checkpoint's layer 1 becomes layer 0 and
    its layer 0 layer 1; embeddings and final norm are its own; the projector stays fresh."""
    ckpt, cfg, tok, weights = _teacher(smoke_teacher)
    assert cfg.llm.config["num_hidden_layers"] == 2
    torch.manual_seed(123)
    model = build_from_config(_llm_from(cfg, ckpt, [1, 0]), tok)
    own = model.state_dict()
    layer_keys = [k for k in weights if k.startswith("llm.model.layers.1.")]
    assert layer_keys
    for k in layer_keys:
        torch.testing.assert_close(own[k.replace(".layers.1.", ".layers.0.")], weights[k], rtol=0, atol=0)
        torch.testing.assert_close(own[k], weights[k.replace(".layers.1.", ".layers.0.")], rtol=0, atol=0)
    torch.testing.assert_close(own["llm.model.norm.weight"], weights["llm.model.norm.weight"], rtol=0, atol=0)
    # the tied embedding/head: stored under one of its two names
    emb = weights.get("llm.model.embed_tokens.weight", weights.get("llm.lm_head.weight"))
    torch.testing.assert_close(own["llm.model.embed_tokens.weight"], emb, rtol=0, atol=0)
    proj = next(k for k in weights if k.startswith("projector.") and weights[k].dim() == 2)
    assert not torch.equal(own[proj], weights[proj])
    # one layer kept: a one-layer LLM holding the checkpoint's layer 1
    small = build_from_config(_llm_from(cfg, ckpt, [1]), tok)
    assert len(small.llm.get_decoder().layers) == 1
    k = layer_keys[0]
    torch.testing.assert_close(small.state_dict()[k.replace(".layers.1.", ".layers.0.")], weights[k])


def test_an_llm_checkpoint_that_does_not_fit_is_refused(smoke_teacher):
    ckpt, cfg, tok, _ = _teacher(smoke_teacher)
    wide = replace(
        cfg.llm, config={**cfg.llm.config, "intermediate_size": 2 * cfg.llm.config["intermediate_size"]}
    )
    with pytest.raises(ConfigError, match="does not fit this model") as e:
        build_from_config(replace(cfg, llm=replace(wide, checkpoint=str(ckpt))), tok)
    assert f"model.llm.checkpoint={ckpt}" in str(e.value) and "mlp" in str(e.value)
    # a 3-layer LLM cannot take all its layers from a 2-layer checkpoint
    config = {k: v for k, v in cfg.llm.config.items() if k != "layer_types"}
    deep = replace(cfg.llm, config={**config, "num_hidden_layers": 3}, checkpoint=str(ckpt))
    with pytest.raises(ConfigError, match="its 2 decoder layers") as e:
        build_from_config(replace(cfg, llm=deep), tok)
    assert "layers.2." in str(e.value)
