"""The three stages through the command line, and the preflight errors (clear message, exit 2, nothing overwritten)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, SMOKE
from omegaconf import OmegaConf
from safetensors.torch import load_file

from mllm_kd.cli import main
from mllm_kd.data_prep.synthetic import make_synthetic


def _run(module, run_dir, *overrides):
    cmd = [sys.executable, "-m", module, "--config", str(SMOKE), f"run_dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """configs/smoke.yaml: data, teacher, stage 1, 2, 3 — each through its own command."""
    run_dir = tmp_path_factory.mktemp("smoke_cli")
    make_synthetic(run_dir / "data", n_images=16)
    started = time.perf_counter()
    for module in ("mllm_kd.teacher", "mllm_kd.stage1", "mllm_kd.stage2", "mllm_kd.stage3"):
        proc = _run(module, run_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, time.perf_counter() - started


def test_smoke_stages_run_in_two_minutes(smoke_run):
    """The five smoke commands together (an idle 2-core machine; a busy one can miss it)."""
    _, seconds = smoke_run
    assert seconds < 120


def test_smoke_stages_write_self_describing_checkpoints(smoke_run):
    run_dir, _ = smoke_run
    for stage in ("teacher_pt", "teacher_sft", "stage1", "stage2", "stage3"):
        final = run_dir / stage / "final"
        for name in (
            "model.safetensors",
            "model.yaml",
            "config.yaml",
            "trainer_state.json",
            "tokenizer/tokenizer.json",
        ):
            assert (final / name).is_file(), f"{stage}: {name} missing"
        cfg = OmegaConf.load(final / "config.yaml")
        assert cfg.stage == stage and cfg.output_dir == f"{run_dir}/{stage}"
        state = json.loads((final / "trainer_state.json").read_text())
        assert state["step"] == state["total_steps"] > 0
        rows = [json.loads(ln) for ln in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, state["total_steps"] + 1))
        distilled = {"mdist_resp", "mdist_vis", "rdist"}
        if stage in ("stage1", "stage3"):
            assert distilled <= set(rows[0]) and all(r["mdist_vis"] > 0 for r in rows)
        else:
            assert not distilled & set(rows[0])


def test_smoke_stages_train_what_they_should(smoke_run):
    run_dir, _ = smoke_run
    w = {
        s: load_file(run_dir / s / "final" / "model.safetensors")
        for s in ("teacher_sft", "stage1", "stage2", "stage3")
    }

    def same(a, b, prefix):
        keys = [k for k in w[a] if k.startswith(prefix)]
        assert keys
        return all(torch.equal(w[a][k], w[b][k]) for k in keys)

    # the student reuses the teacher's vision tower, frozen throughout
    assert same("teacher_sft", "stage1", "vision.") and same("stage1", "stage3", "vision.")
    # stage 1 trains only the projector; stages 2 and 3 train projector and LLM
    assert not same("stage1", "stage2", "projector.") and not same("stage1", "stage2", "llm.")
    assert not same("stage2", "stage3", "llm.")


def test_rerun_skips_a_finished_stage(smoke_run):
    run_dir, _ = smoke_run
    before = _digest(run_dir / "stage2/final/model.safetensors")
    proc = _run("mllm_kd.stage2", run_dir)
    assert proc.returncode == 0 and "already finished" in proc.stderr
    assert _digest(run_dir / "stage2/final/model.safetensors") == before


def _fails(capsys, stage, run_dir, *overrides, config=SMOKE):
    code = main([stage], "test", "test", ["--config", str(config), f"run_dir={run_dir}", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def test_unknown_config_key(capsys, smoke_run):
    err = _fails(capsys, "stage3", smoke_run[0], "loss.w_relation=1", "overwrite=true")
    assert "w_relation" in err and "smoke.yaml" in err


def test_previous_stage_missing(capsys, tmp_path, smoke_data):
    err = _fails(capsys, "stage2", tmp_path, f"data_dir={smoke_data}/data")
    assert f"{tmp_path}/stage1" in err and "does not exist" in err
    assert not (tmp_path / "stage2").exists()


@pytest.fixture()
def stage3_digest(smoke_run):
    path = smoke_run[0] / "stage3/final/model.safetensors"
    before = _digest(path)
    yield
    assert _digest(path) == before, "a refused run overwrote the previous result"


def _bad_data(smoke_run, tmp_path, mutate):
    src = smoke_run[0] / "data"
    dst = tmp_path / "data"
    shutil.copytree(src, dst)
    records = json.loads((dst / "instruct.json").read_text())
    mutate(records, dst)
    (dst / "instruct.json").write_text(json.dumps(records))
    return [f"data.path={dst}/instruct.json", f"data.image_folder={dst}/images", "overwrite=true"]


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r, d: os.remove(d / "images" / r[2]["image"]), ["qa-2", "does not exist"]),
        (lambda r, d: (d / "images" / r[3]["image"]).write_bytes(b"not a png"), ["qa-3", "corrupt"]),
        (
            lambda r, d: r[1]["conversations"].__setitem__(1, {"from": "human", "value": "x"}),
            ["qa-1", "turn 1"],
        ),
        (
            lambda r, d: r[4]["conversations"][0].__setitem__("value", "no image here"),
            ["qa-4", "0 <image> placeholders but 1 images"],
        ),
    ],
    ids=["missing-image", "corrupt-image", "malformed-conversation", "image-count"],
)
def test_bad_data_is_refused_before_anything_is_written(
    capsys, smoke_run, tmp_path, stage3_digest, mutate, expected
):
    err = _fails(capsys, "stage3", smoke_run[0], *_bad_data(smoke_run, tmp_path, mutate))
    for text in expected:
        assert text in err


def test_teacher_with_another_vocabulary_is_refused(capsys, smoke_run, tmp_path, stage3_digest):
    from mllm_kd.checkpoint.integrity import write_manifest
    from mllm_kd.model.tokenization import train_bpe_tokenizer

    teacher = tmp_path / "teacher"
    shutil.copytree(smoke_run[0] / "teacher_sft/final", teacher)
    shutil.rmtree(teacher / "tokenizer")
    train_bpe_tokenizer(["completely different words here"] * 5, teacher / "tokenizer", vocab_size=300)
    write_manifest(teacher)  # a consistent checkpoint (not a damaged one) with another tokenizer
    err = _fails(capsys, "stage3", smoke_run[0], f"teacher.checkpoint={teacher}", "overwrite=true")
    assert "different vocabulary" in err and str(teacher) in err and "same tokenizer" in err


def test_teacher_with_other_visual_token_count_is_refused(smoke_run):
    from mllm_kd.checkpoint.native import load_checkpoint_model
    from mllm_kd.errors import CompatibilityError
    from mllm_kd.teacher.load import check_compatible

    student, tok, _ = load_checkpoint_model(smoke_run[0] / "stage2")
    teacher, t_tok, _ = load_checkpoint_model(smoke_run[0] / "teacher_sft")
    teacher.num_visual_tokens = student.num_visual_tokens + 1  # as if its patch size differed
    with pytest.raises(CompatibilityError, match="visual tokens per image"):
        check_compatible(teacher, t_tok, student, tok, "T")
