"""easy-VQA as a local lmms-eval task: the task folder (fast), and lmms-eval 0.7.3's llava_hf on an exported
model giving the accuracy and the answers of `python -m mllm_kd.eval` (slow; needs lmms-eval, see
docs/evaluation.md: LMMS_PYTHON=/path/to/venv/bin/python pytest -m slow tests/test_lmms_eval.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMOKE

from mllm_kd.eval.cli import main as eval_main
from mllm_kd.eval.core import Prediction
from mllm_kd.eval.lmms import main as lmms_main
from mllm_kd.eval.tasks.easyvqa import EasyVQATask


@pytest.fixture(scope="module")
def easyvqa_data(tmp_path_factory):
    pytest.importorskip("easy_vqa")
    from mllm_kd.data_prep.easyvqa import prepare_easyvqa

    out = tmp_path_factory.mktemp("evqa") / "data"
    prepare_easyvqa(out, max_train_images=60, max_test_questions=30, log=None)
    return out


def _task(data: Path, out: Path, *more: str) -> int:
    args = ["--questions", str(data / "test_questions.jsonl"), "--answers", str(data / "test_answers.json")]
    return lmms_main([*args, "--images", str(data / "images"), "--out", str(out), *more])


def test_task_folder(easyvqa_data, tmp_path):
    import yaml

    assert _task(easyvqa_data, tmp_path / "task", "--limit", "12", "--max-new-tokens", "4") == 0
    rows = [json.loads(ln) for ln in (tmp_path / "task/test.jsonl").read_text().splitlines()]
    questions = [json.loads(ln) for ln in (easyvqa_data / "test_questions.jsonl").read_text().splitlines()]
    answers = json.loads((easyvqa_data / "test_answers.json").read_text())
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in questions[:12]]
    for r, q in zip(rows, questions):
        assert r["text"] == q["text"] and r["answer"] == answers[q["question_id"]]["answer"]
        assert Path(r["image_path"]).is_file() and Path(r["image_path"]).is_absolute()

    class Loader(yaml.SafeLoader):  # lmms-eval's `!function module.name` tags
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    task = yaml.load((tmp_path / "task/easyvqa_local.yaml").read_text(), Loader=Loader)
    assert task["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "task/test.jsonl").resolve())
    assert (
        task["generation_kwargs"]["max_new_tokens"] == 4
        and task["doc_to_visual"] == "utils.easyvqa_doc_to_visual"
    )
    assert (tmp_path / "task/utils.py").is_file()


def test_task_scoring_is_the_mllm_kd_rule(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval" / "lmms"))
    try:
        import utils as lmms_utils  # the task's functions, as lmms-eval imports them
    finally:
        sys.path.pop(0)
    cases = [
        ("Circle.", "circle"),
        ("a circle", "circle"),
        ("RED", "red"),
        ("no", "yes"),
        ("blue ", "blue"),
        ("", "no"),
    ]
    task = EasyVQATask()
    path = tmp_path / "a.json"
    path.write_text(json.dumps({str(i): {"answer": a, "type": "shape"} for i, (_, a) in enumerate(cases)}))
    annotations = task.load(path)
    for i, (pred, answer) in enumerate(cases):
        ours = task.score([Prediction(str(i), pred)], _only(annotations, str(i)))["accuracy"]
        theirs = lmms_utils.easyvqa_process_results({"answer": answer}, [pred])["exact_match"]
        assert ours == theirs, (pred, answer)


def _only(annotations, qid):
    from dataclasses import replace

    return replace(annotations, items={qid: annotations.items[qid]})


def test_bad_input_names_the_file(easyvqa_data, tmp_path, capsys):
    bad = tmp_path / "answers.json"
    bad.write_text(json.dumps({"0": {"answer": "circle"}}))
    args = ["--questions", str(easyvqa_data / "test_questions.jsonl"), "--answers", str(bad)]
    assert lmms_main([*args, "--images", str(easyvqa_data / "images"), "--out", str(tmp_path / "t")]) == 2
    assert f"question 1 has no answer in {bad}" in capsys.readouterr().err


def _lmms_python() -> str | None:
    """An interpreter with lmms-eval: $LMMS_PYTHON, or this one."""
    if os.environ.get("LMMS_PYTHON"):
        return os.environ["LMMS_PYTHON"]
    return sys.executable if importlib.util.find_spec("lmms_eval") else None


@pytest.mark.slow
def test_lmms_eval_llava_hf_gives_the_mllm_kd_accuracy(easyvqa_data, tmp_path):
    python = _lmms_python()
    if python is None:
        pytest.skip("lmms-eval is not installed (set LMMS_PYTHON to a Python that has it)")
    from mllm_kd.cli import stage_config
    from mllm_kd.export import main as export_main
    from mllm_kd.stages import STAGES

    run = tmp_path / "run"
    common = [f"run_dir={run}", f"data_dir={easyvqa_data}", "train.batch_size=8", "data.max_length=96"]
    for stage, steps in (("teacher_pt", 10), ("teacher_sft", 60)):
        STAGES[stage].run(stage_config(SMOKE, stage, [*common, f"train.max_steps={steps}", "optim.lr=3e-3"]))
    exported = tmp_path / "exported"
    assert export_main(["--checkpoint", str(run / "teacher_sft"), "--out", str(exported)]) == 0
    answers, scores = tmp_path / "answers.jsonl", tmp_path / "scores.json"
    q = ["--task", "easyvqa", "--questions", str(easyvqa_data / "test_questions.jsonl")]
    assert (
        eval_main(
            [
                "run",
                "--model",
                str(run / "teacher_sft"),
                *q,
                "--images",
                str(easyvqa_data / "images"),
                "--out",
                str(answers),
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        eval_main(
            [
                "score",
                "--task",
                "easyvqa",
                "--predictions",
                str(answers),
                "--annotations",
                str(easyvqa_data / "test_answers.json"),
                "--out",
                str(scores),
            ]
        )
        == 0
    )
    ours = json.loads(scores.read_text())

    assert _task(easyvqa_data, tmp_path / "task") == 0
    out = tmp_path / "lmms_out"
    cmd = [
        python,
        "-m",
        "lmms_eval",
        "--model",
        "llava_hf",
        "--model_args",
        f"pretrained={exported},device=cpu,device_map=cpu,dtype=float32",
        "--tasks",
        "easyvqa_local",
        "--include_path",
        str(tmp_path / "task"),
        "--batch_size",
        "1",
        "--log_samples",
        "--output_path",
        str(out),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=1800, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    results = sorted(out.glob("*/*_results.json"))
    assert results, (
        f"lmms-eval wrote no results (it exits 0 on errors):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    theirs = json.loads(results[-1].read_text())["results"]["easyvqa_local"]
    samples = [
        json.loads(ln) for ln in next(out.glob("*/*_samples_easyvqa_local.jsonl")).read_text().splitlines()
    ]
    ours_text = [json.loads(ln)["text"] for ln in answers.read_text().splitlines()]
    assert [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])] == ours_text
    assert round(theirs["exact_match,none"], 2) == ours["accuracy"]
    shutil.rmtree(out)
