"""The model card `python -m mllm_kd.export` writes: Hub YAML header, the run's history, scores, loading snippet."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import SMOKE
from PIL import Image

from mllm_kd.cli import stage_config
from mllm_kd.export import main as export_main
from mllm_kd.model_card import stage_history


@pytest.fixture(scope="module")
def student_run(smoke_teacher, tmp_path_factory):
    """Student stages 1-3 of the smoke recipe (2 steps each), stage 3 with RDist weighted 0.5."""
    from mllm_kd.stages import STAGES

    run = tmp_path_factory.mktemp("card_run")
    common = [
        f"run_dir={run}",
        f"data_dir={smoke_teacher}/data",
        f"teacher.checkpoint={smoke_teacher}/teacher_sft",
        f"model.vision.checkpoint={smoke_teacher}/teacher_sft",
        "train.max_steps=2",
        "train.batch_size=2",
        "stages.stage3.loss.w_rel=0.5",
    ]
    for stage in ("stage1", "stage2", "stage3"):
        STAGES[stage].run(stage_config(SMOKE, stage, common))
    return run, smoke_teacher


def _card(out):
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    return header, text


def test_card_header_and_history(student_run, tmp_path, monkeypatch):
    run, teacher = student_run
    (run / "eval").mkdir()
    score = {"task": "easyvqa", "model_id": "kd", "headline": "accuracy", "accuracy": 61.25, "n": 80}
    (run / "eval" / "easyvqa.json").write_text(json.dumps(score))
    (run / "eval" / "notes.json").write_text(json.dumps({"not": "a score"}))  # skipped, not an error
    out = tmp_path / "student"
    args = ["--checkpoint", str(run / "stage3"), "--out", str(out), "--license", "apache-2.0"]
    assert export_main([*args, "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct"]) == 0
    header, text = _card(out)
    assert header["library_name"] == "transformers"
    assert header["pipeline_tag"] == "image-text-to-text"
    assert header["license"] == "apache-2.0"
    assert header["base_model"] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert {"llava", "knowledge-distillation"} <= set(header["tags"]) and "lora" not in header["tags"]
    result = header["model-index"][0]["results"][0]
    assert result["dataset"]["name"] == "easyvqa" and result["metrics"][0] == {
        "type": "accuracy",
        "value": 61.25,
    }
    assert "| easyvqa | accuracy | 61.25 | kd |" in text

    # the history, oldest first, each stage's row from its own checkpoint
    rows = {
        line.split("|")[1].strip(): line
        for line in text.splitlines()
        if line.startswith("| stage") and not line.startswith("| stage |")
    }
    assert list(rows) == ["stage1", "stage2", "stage3"]
    assert "| CE + MDist_resp + MDist_vis + 0.5 RDist (MDist: fkl, tau=1) |" in rows["stage3"]
    assert "| CE |" in rows["stage2"] and "| projector |" in rows["stage1"]
    assert "| projector, llm |" in rows["stage3"]
    for stage, line in rows.items():
        state = json.loads((run / stage / "final/trainer_state.json").read_text())
        cells = [c.strip() for c in line.split("|")]
        assert cells[5] == str(state["step"]) == "2" and cells[6] == str(state["samples"]) == "4"
    assert f"**Teacher**: `{teacher / 'teacher_sft' / 'final'}`" in text
    assert "qwen2 LLM (2 layers, hidden size 64)" in text
    # the loading snippet runs as written, next to the exported folder
    snippet = text.split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    Image.open(teacher / "data/images/00000.png").save("image.png")
    exec(compile(snippet, "README.md", "exec"), {})


def test_card_without_scores_or_hub_ids(student_run, tmp_path):
    run, _ = student_run
    out = tmp_path / "plain"
    assert export_main(["--checkpoint", str(run / "stage2"), "--out", str(out)]) == 0
    header, text = _card(out)
    assert header["license"] == "unknown" and "base_model" not in header
    assert "(LLaVA-KD: distillation in stage1)." in text  # stage2 itself trains on labels


def test_history_follows_init_from(student_run):
    run, _ = student_run
    assert [r.name for r in stage_history(run / "stage3")] == ["stage1", "stage2", "stage3"]


def test_bad_eval_results_file_is_named(student_run, tmp_path, capsys):
    run, _ = student_run
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"task": "easyvqa"}))
    args = ["--checkpoint", str(run / "stage3"), "--out", str(tmp_path / "o"), "--eval-results", str(bad)]
    assert export_main(args) == 2
    assert f"--eval-results {bad}: not a score file" in capsys.readouterr().err


def test_loss_words_name_the_response_term_narrowed_to_the_teachers_right_answers(tmp_path):
    from mllm_kd.model_card import StageRecord, _loss_words

    loss = {"w_ce": 1.0, "w_resp": 1.0, "w_vis": 1.0, "w_rel": 1.0, "w_emb": 0.0, "kind": "fkl"}
    config = {"teacher": {"checkpoint": "t"}, "loss": {**loss, "resp_where_teacher_right": True}}
    words = _loss_words(StageRecord("stage3", tmp_path, config, {}))
    assert words.endswith("(MDist: fkl, tau=1); MDist_resp only at answer tokens the teacher gets right")
    config["loss"]["w_resp"] = 0.0  # nothing to narrow
    assert "teacher gets right" not in _loss_words(StageRecord("stage3", tmp_path, config, {}))
    assert "teacher gets right" not in _loss_words(
        StageRecord("stage3", tmp_path, {**config, "loss": loss}, {})
    )
