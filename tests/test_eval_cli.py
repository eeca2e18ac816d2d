"""The ``python -m mllm_kd.eval`` command line: score (one JSON object), report (markdown), errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_answers

from mllm_kd.eval.cli import main

EASY = {"0": {"answer": "circle", "type": "shape"}, "1": {"answer": "blue", "type": "color"}}


def test_score_subprocess_prints_one_json_object(tmp_path):
    ann = tmp_path / "easy.json"
    ann.write_text(json.dumps(EASY))
    preds = write_answers(
        tmp_path / "answers.jsonl", [("0", "A circle."), ("1", "red")], model_id="student-dft"
    )
    out = tmp_path / "run" / "eval" / "easyvqa.json"
    cmd = [
        sys.executable,
        "-m",
        "mllm_kd.eval",
        "score",
        "--task",
        "easyvqa",
        "--predictions",
        str(preds),
        "--annotations",
        str(ann),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # the whole of stdout is one JSON object
    assert (
        result["task"] == "easyvqa"
        and result["model_id"] == "student-dft"
        and result["headline"] == "accuracy"
    )
    assert result["accuracy"] == pytest.approx(50.0)  # "circle" right, "red" != "blue"
    assert result["by_type"] == pytest.approx({"color": 0.0, "shape": 100.0})
    assert json.loads(out.read_text()) == result


def test_score_errors_exit_2(tmp_path, capsys):
    preds = write_answers(tmp_path / "answers.jsonl", [("0", "circle")], model_id="student-dft")
    missing = tmp_path / "nope.json"
    assert (
        main(["score", "--task", "easyvqa", "--predictions", str(preds), "--annotations", str(missing)]) == 2
    )
    assert f"annotation file {missing} does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": "0", "text": "circle"}\n{"question_id": "1"}\n')
    ann = tmp_path / "easy.json"
    ann.write_text(json.dumps(EASY))
    assert main(["score", "--task", "easyvqa", "--predictions", str(bad), "--annotations", str(ann)]) == 2
    assert f"{bad}:2: 'text' must be a string" in capsys.readouterr().err
    assert (
        main(
            ["score", "--task", "gqa", "--predictions", str(preds), "--annotations", str(ann), "--split", "x"]
        )
        == 2
    )
    assert "takes no --split" in capsys.readouterr().err


def test_score_testdev_needs_submission(tmp_path, capsys):
    qfile = tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    qfile.write_text(
        json.dumps(
            {
                "data_subtype": "test-dev2015",
                "questions": [{"question_id": 3, "image_id": 1, "question": "q?"}],
            }
        )
    )
    preds = write_answers(tmp_path / "a.jsonl", [(3, "Three")], model_id="student-dft")
    args = ["score", "--task", "vqav2", "--predictions", str(preds), "--annotations", str(qfile)]
    assert main(args) == 2
    assert "--submission" in capsys.readouterr().err
    assert main([*args, "--submission", str(tmp_path / "up.json")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["submission_rows"] == 1 and "accuracy" not in printed
    assert json.loads((tmp_path / "up.json").read_text()) == [{"question_id": 3, "answer": "3"}]


def put_score(run: Path, task: str, model: str, **metrics) -> None:
    (run / "eval").mkdir(parents=True, exist_ok=True)
    headline = next(iter(metrics))
    (run / "eval" / f"{task}.json").write_text(
        json.dumps({"task": task, "model_id": model, "headline": headline, **metrics})
    )


def test_report_table(tmp_path, capsys):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    put_score(teacher, "gqa", "teacher-7b", accuracy=60.0)
    put_score(teacher, "mme", "teacher-7b", perception=1500.0, cognition=300.0)
    put_score(student, "gqa", "student-1b", accuracy=50.0)
    (student / "eval" / "vqav2_upload.json").write_text("[]")  # a submission file: skipped
    assert main(["report", str(teacher), str(student), "--out", str(tmp_path / "table.md")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| Model | GQA | MME-P | Avg |"
    # teacher: (60 + 1500/2000*100) / 2 = (60 + 75) / 2 = 67.5; student has GQA only: 50.0, flagged
    assert lines[2] == "| teacher-7b | 60.0 | 1500.0 | 67.5 |"
    assert lines[3] == "| student-1b | 50.0 | – | 50.0* |"
    assert (tmp_path / "table.md").read_text().splitlines() == lines


def test_report_from_score_out_and_errors(tmp_path, capsys):
    ann = tmp_path / "easy.json"
    ann.write_text(json.dumps(EASY))
    for name, text in (("a", "blue"), ("b", "green")):
        preds = write_answers(tmp_path / f"{name}.jsonl", [("1", text)], model_id="same")
        out = tmp_path / name / "eval" / "easyvqa.json"
        assert (
            main(
                [
                    "score",
                    "--task",
                    "easyvqa",
                    "--predictions",
                    str(preds),
                    "--annotations",
                    str(ann),
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    capsys.readouterr()
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    lines = capsys.readouterr().out.splitlines()
    # the same model_id twice: rows are told apart by their run folder
    assert lines[2] == f"| same ({tmp_path / 'a'}) | 100.0 | 100.0 |"
    assert lines[3] == f"| same ({tmp_path / 'b'}) | 0.0 | 0.0 |"
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no score files" in capsys.readouterr().err
