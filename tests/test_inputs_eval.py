"""Bad input to the evaluator: malformed question, annotation and answer files (wrong and duplicate ids,
missing fields, torn last lines, bytes that are not UTF-8). Every case exits 2 with one line naming the
file (and line), and leaves the output files as they were."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mllm_kd.eval.cli import main

FAST = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
EASY = {"0": {"answer": "circle", "type": "shape"}, "1": {"answer": "blue", "type": "color"}}
GOOD_LINES = ['{"question_id": "0", "text": "circle"}', '{"question_id": "1", "text": "red"}']
PREVIOUS = "previous scores\n"


def refused(capsys, argv: list[str], *outputs: Path) -> str:
    """Run the evaluator in-process; assert exit 2, one line on stderr, no traceback, outputs unchanged."""
    before = {p: p.read_bytes() if p.exists() else None for p in outputs}
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, (
        captured.err
    )
    assert not captured.out
    for p, content in before.items():
        assert (p.read_bytes() if p.exists() else None) == content, f"{p} changed on a refused run"
    return lines[0]


def score_easy(capsys, tmp_path, preds: bytes, ann: bytes | None = None) -> tuple[str, Path, Path]:
    pred_path, ann_path = tmp_path / "answers.jsonl", tmp_path / "ann.json"
    pred_path.write_bytes(preds)
    ann_path.write_bytes(json.dumps(EASY).encode() if ann is None else ann)
    out = tmp_path / "eval" / "easyvqa.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(PREVIOUS)
    argv = ["score", "--task", "easyvqa", "--predictions", str(pred_path), "--annotations", str(ann_path)]
    return refused(capsys, [*argv, "--out", str(out)], out), pred_path, ann_path


def _lines(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


# (name, answers file bytes, what the error line says besides the file name)
ANSWER_CASES = [
    ("torn-last-line", _lines(GOOD_LINES[0])[:-1] + b'\n{"question_id": "1", "te', ":2: not valid JSON"),
    ("bad-middle-line", _lines(GOOD_LINES[0], "{oops", GOOD_LINES[1]), ":2: not valid JSON"),
    ("missing-text", _lines(GOOD_LINES[0], '{"question_id": "1"}'), ":2: 'text' must be a string"),
    ("missing-id", _lines('{"text": "circle"}'), ":1: 'question_id' must be"),
    ("bool-id", _lines('{"question_id": true, "text": "x"}'), ":1: 'question_id' must be"),
    ("line-is-a-list", _lines("[1, 2]"), ":1: expected a JSON object"),
    ("metadata-string", _lines('{"question_id": "0", "text": "x", "metadata": "m"}'), "'metadata' must be"),
    (
        "duplicate-id",
        _lines(GOOD_LINES[0], GOOD_LINES[1], GOOD_LINES[0]),
        ":3: question_id '0' answered twice",
    ),
    (
        "unknown-id",
        _lines(GOOD_LINES[0], '{"question_id": "9", "text": "x"}'),
        ":2: question_id '9' is not in",
    ),
    ("not-utf8", _lines(GOOD_LINES[0]) + b'{"question_id": "1", "text": "\xff"}\n', ":2: not UTF-8"),
    ("empty-file", b"", "no predictions"),
]


@pytest.mark.parametrize("content, expected", [c[1:] for c in ANSWER_CASES], ids=[c[0] for c in ANSWER_CASES])
def test_bad_answers_file_exits_2_naming_file_and_line(capsys, tmp_path, content, expected):
    line, preds, _ = score_easy(capsys, tmp_path, content)
    assert f"{preds}" in line and expected in line


ANNOTATION_CASES = [
    (
        "duplicate-jsonl",
        _lines('{"question_id": "0", "answer": "a"}', '{"question_id": "0", "answer": "b"}'),
        ":2:",
    ),
    (
        "duplicate-list",
        json.dumps([{"question_id": 0, "answer": "a"}, {"question_id": "0", "answer": "b"}]),
        "record 1",
    ),
    ("duplicate-key", b'{"0": {"answer": "a"}, "0": {"answer": "b"}}', "'0' appears twice"),
    ("missing-answer", json.dumps({"0": {"type": "shape"}}), "question 0: missing field 'answer'"),
    ("missing-id", json.dumps([{"answer": "a"}]), "record 0: missing field 'question_id'"),
    ("answer-a-list", json.dumps({"0": {"answer": ["a"]}}), "'answer' must be a string"),
    (
        "torn-last-line",
        _lines('{"question_id": "0", "answer": "a"}')[:-1] + b'\n{"question_id": "1", "ans',
        ":2: not",
    ),
    ("not-utf8", b'{"0": {"answer": "\xff"}}', "not UTF-8"),
    ("a-number", b"42", "expected a JSON object"),
    ("empty-file", b"", "no annotations"),
]


@pytest.mark.parametrize(
    "content, expected", [c[1:] for c in ANNOTATION_CASES], ids=[c[0] for c in ANNOTATION_CASES]
)
def test_bad_annotation_file_exits_2_naming_file(capsys, tmp_path, content, expected):
    content = content.encode() if isinstance(content, str) else content
    line, _, ann = score_easy(capsys, tmp_path, _lines(*GOOD_LINES), content)
    assert str(ann) in line and expected in line


def _vqa(qid):
    return {"question_id": qid, "answers": [{"answer": "x"}], "answer_type": "other", "question_type": "what"}


# Every task's annotations with one id given twice: (task, {file name: content}, the path to pass, expected)
DUPLICATE_CASES = [
    ("vqav2", {"ann.json": json.dumps({"annotations": [_vqa(0), _vqa(1), _vqa(0)]})}, "ann.json",
     "annotations[2]: question_id 0 appears twice (first at"),
    ("textvqa", {"t.json": json.dumps({"data": [{"question_id": 0, "answers": ["x"], "image_id": "a"}] * 2})},
     "t.json", "data[1]: question_id 0 appears twice"),
    ("vizwiz", {"v.json": json.dumps([{"image": "a.jpg", "question": "q", "answers": [{"answer": "x"}],
                                      "answer_type": "other"}] * 2)}, "v.json", "item 1: image 'a.jpg' appears twice"),
    ("gqa", {"g.json": '{"0": {"answer": "x"}, "1": {"answer": "y"}, "0": {"answer": "z"}}'}, "g.json",
     "key '0' appears twice in one JSON object"),
    ("scienceqa", {"pid_splits.json": '{"test": ["0", "1", "0"]}',
                   "problems.json": '{"0": {"answer": 0}, "1": {"answer": 1}}'}, ".",
     "split test: question_id '0' appears twice"),
    ("scienceqa", {"pid_splits.json": '{"test": ["0"]}',
                   "problems.json": '{"0": {"answer": 0}, "0": {"answer": 1}}'}, ".",
     "key '0' appears twice in one JSON object"),
    ("mmbench", {"m.tsv": "index\tquestion\thint\tA\tB\tanswer\tcategory\n0\tq\t\ta\tb\tA\tc\n0\tq\t\ta\tb\tA\tc\n"},
     "m.tsv", ":3: index 0 appears twice"),
]  # fmt: skip


@pytest.mark.parametrize("task, files, target, expected", DUPLICATE_CASES, ids=lambda x: str(x)[:12])
def test_every_task_refuses_an_id_given_twice(capsys, tmp_path, task, files, target, expected):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    preds = tmp_path / "answers.jsonl"
    preds.write_bytes(_lines(*GOOD_LINES))
    out = tmp_path / "scores.json"
    argv = ["score", "--task", task, "--predictions", str(preds), "--annotations", str(tmp_path / target)]
    line = refused(capsys, [*argv, "--out", str(out)], out)
    assert expected in line, line


def test_missing_files_exit_2(capsys, tmp_path):
    preds = tmp_path / "answers.jsonl"
    preds.write_text(GOOD_LINES[0] + "\n")
    argv = ["score", "--task", "easyvqa", "--predictions"]
    assert "predictions file /nope.jsonl does not exist" in refused(
        capsys, [*argv, "/nope.jsonl", "--annotations", str(preds)]
    )
    assert "annotation file /nope.json does not exist" in refused(
        capsys, [*argv, str(preds), "--annotations", "/nope.json"]
    )


def test_pope_duplicate_question_ids_are_named(capsys, tmp_path):
    ann = tmp_path / "coco_pope_random.json"
    row = {"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"}
    ann.write_text(json.dumps(row) + "\n" + json.dumps({**row, "label": "no"}) + "\n")
    preds = tmp_path / "answers.jsonl"
    preds.write_text('{"question_id": 1, "text": "yes"}\n')
    line = refused(
        capsys, ["score", "--task", "pope", "--predictions", str(preds), "--annotations", str(ann)]
    )
    assert f"{ann}:2: question_id 1 appears twice (first at {ann}:1)" in line


def test_a_failed_score_writes_no_submission(capsys, tmp_path):
    qfile = tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    qfile.write_text(
        json.dumps(
            {
                "data_subtype": "test-dev2015",
                "questions": [{"question_id": 3, "image_id": 1, "question": "q?"}],
            }
        )
    )
    preds = tmp_path / "a.jsonl"
    preds.write_text('{"question_id": 3, "text": "x"}\n{"question_id": 4, "text": "y"}\n')
    upload, out = tmp_path / "up.json", tmp_path / "scores.json"
    argv = ["score", "--task", "vqav2", "--predictions", str(preds), "--annotations", str(qfile)]
    line = refused(capsys, [*argv, "--submission", str(upload), "--out", str(out)], upload, out)
    assert f"{preds}:2: question_id 4 is not in the annotations" in line
    assert not upload.exists() and not out.exists()


def test_report_of_a_broken_score_file_exits_2(capsys, tmp_path):
    (tmp_path / "run" / "eval").mkdir(parents=True)
    bad = tmp_path / "run" / "eval" / "gqa.json"
    bad.write_bytes(b'{"task": "gqa", "accuracy": 6\xff}')
    out = tmp_path / "table.md"
    line = refused(capsys, ["report", str(tmp_path / "run"), "--out", str(out)], out)
    assert str(bad) in line and "not UTF-8" in line


# ----------------------------------------------------------------------------------------------- run
@pytest.fixture
def fake_ckpt(tmp_path) -> Path:
    """Passes as a finished checkpoint; the question checks run before any weights are read."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"")
    (ckpt / "trainer_state.json").write_text("{}")
    return ckpt


QUESTION_CASES = [
    (
        "duplicate-id",
        ['{"question_id": 1, "text": "q?"}', '{"question_id": "1", "text": "r?"}'],
        ":2: question_id '1' appears twice",
    ),
    ("missing-text", ['{"question_id": 1, "text": "q?"}', '{"question_id": 2}'], ":2: a question needs"),
    ("image-a-number", ['{"question_id": 1, "text": "q?", "image": 5}'], ":1: 'image' must be a path"),
    ("torn-last-line", ['{"question_id": 1, "text": "q?"}', '{"question_id": 2, "te'], ":2: not valid JSON"),
]


@pytest.mark.parametrize(
    "lines, expected", [c[1:] for c in QUESTION_CASES], ids=[c[0] for c in QUESTION_CASES]
)
def test_bad_question_file_exits_2_and_writes_no_answers(capsys, tmp_path, fake_ckpt, lines, expected):
    questions = tmp_path / "questions.jsonl"
    questions.write_text("\n".join(lines) + "\n")
    out = tmp_path / "answers.jsonl"
    argv = ["run", "--model", str(fake_ckpt), "--task", "easyvqa", "--questions", str(questions)]
    line = refused(capsys, [*argv, "--out", str(out), "--no-progress"], out)
    assert str(questions) in line and expected in line
    assert not out.exists()


def test_run_refuses_a_foreign_answers_file_and_leaves_it(capsys, tmp_path, fake_ckpt):
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"question_id": 1, "text": "q?"}\n{"question_id": 2, "text": "r?"}\n')
    out = tmp_path / "answers.jsonl"
    out.write_text(
        '{"question_id": 1, "prompt": "q?", "text": "a"}\nnot json\n{"question_id": 2, "text": "b"}\n'
    )
    argv = ["run", "--model", str(fake_ckpt), "--task", "easyvqa", "--questions", str(questions)]
    line = refused(capsys, [*argv, "--out", str(out), "--no-progress"], out)
    assert f"{out}:2: not an answer line" in line


# ------------------------------------------------------------------------------------------ properties
ANSWER_LINE = st.one_of(
    st.sampled_from([*GOOD_LINES, '{"question_id": "0", "text": "c"}', '{"question_id": 0, "text": 1}']),
    st.fixed_dictionaries(
        {
            "question_id": st.sampled_from(["0", "1", "2", 0, 1, True, None]),
            "text": st.text(max_size=5) | st.none(),
        },
        optional={
            "metadata": st.none() | st.integers() | st.dictionaries(st.text(max_size=3), st.integers())
        },
    ).map(json.dumps),
    st.text(max_size=12),
)


@FAST
@given(lines=st.lists(ANSWER_LINE, max_size=5), torn=st.booleans())
def test_property_any_answers_file_scores_or_is_named(capsys, tmp_path, lines, torn):
    preds, ann = tmp_path / "answers.jsonl", tmp_path / "ann.json"
    text = "\n".join(lines) + ("" if torn else "\n")
    preds.write_text(text)
    ann.write_text(json.dumps(EASY))
    out = tmp_path / "scores.json"
    out.write_text(PREVIOUS)
    code = main(
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
    captured = capsys.readouterr()
    assert code in (0, 2) and "Traceback" not in captured.err
    if code == 2:
        lines_err = captured.err.strip().splitlines()
        assert len(lines_err) == 1 and str(preds) in lines_err[0]
        assert out.read_text() == PREVIOUS
    else:
        assert json.loads(out.read_text())["n"] >= 1


# ------------------------------------------------------------------------------------------ subprocess
def test_the_real_entry_points_print_one_line_and_no_traceback(tmp_path):
    preds, ann = tmp_path / "answers.jsonl", tmp_path / "ann.json"
    preds.write_text(GOOD_LINES[0] + '\n{"question_id": "1", "te')
    ann.write_text(json.dumps(EASY))
    cmd = [sys.executable, "-m", "mllm_kd.eval", "score", "--task", "easyvqa"]
    proc = subprocess.run(
        [*cmd, "--predictions", str(preds), "--annotations", str(ann)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[0].startswith(f"error: {preds}:2: not valid JSON")
    assert len(proc.stderr.strip().splitlines()) == 1
    out = tmp_path / "exported"
    cmd = [sys.executable, "-m", "mllm_kd.export", "--checkpoint", str(tmp_path / "nope"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: --checkpoint {tmp_path / 'nope'} does not exist"]
    assert not out.exists()
