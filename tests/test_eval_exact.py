"""GQA and easy-VQA scoring (exact match after normalisation) on small files in their formats."""

import json

import pytest
from conftest import write_answers

from mllm_kd.errors import DataError
from mllm_kd.eval.core import SHORT_ANSWER, read_predictions
from mllm_kd.eval.tasks import get_task


def test_gqa_score(tmp_path):
    def q(answer, structural, balanced=True):
        return {
            "imageId": "n1",
            "question": "q?",
            "answer": answer,
            "isBalanced": balanced,
            "types": {"structural": structural, "semantic": "attr", "detailed": "attr"},
            "semantic": [],
            "groups": {"global": None},
        }

    questions = {
        "201": q("yes", "verify"),
        "202": q("left", "query"),
        "203": q("white", "query"),
        "204": q("no", "logical"),
        "205": q("red", "query", balanced=False),
        "206": q("chair", "query"),
        "207": q("blue", "query"),  # not answered
    }
    ann = tmp_path / "testdev_balanced_questions.json"
    ann.write_text(json.dumps(questions))
    rows = [
        ("201", "Yes."),  # rstrip('.').lower(): "yes", right
        (202, "Left"),  # int id, "left": right
        ("203", "The white one"),  # GQA keeps articles: wrong
        ("204", "yes"),  # wrong
        ("205", "red"),  # unbalanced: not counted, as in the official eval.py
        ("206", "chair."),  # right
    ]
    task = get_task("gqa")
    scores = task.score(read_predictions(write_answers(tmp_path / "a.jsonl", rows)), task.load(ann))
    # balanced: 201 202 203 204 206 207 (unanswered: wrong) -> 3/6; binary (verify, logical): 201 204 -> 1/2;
    # open (query): 202 203 206 207 -> 2/4
    assert scores["accuracy"] == pytest.approx(50.0)
    assert scores["binary"] == pytest.approx(50.0)
    assert scores["open"] == pytest.approx(50.0)
    assert scores["by_structural_type"] == {
        "logical": {"accuracy": 0.0, "n": 1},
        "query": {"accuracy": 50.0, "n": 4},
        "verify": {"accuracy": 100.0, "n": 1},
    }
    assert (scores["n"], scores["missing"]) == (6, 1)
    first = task.questions(ann)[0]
    assert (first.question_id, first.image, first.prompt) == ("201", "n1.jpg", f"q?\n{SHORT_ANSWER}")


EASY = {
    "0": {"answer": "circle", "type": "shape", "question": "what shape is in the image?", "image": "0.png"},
    "1": {"answer": "blue", "type": "color", "question": "what color is the shape?", "image": "0.png"},
    "2": {"answer": "yes", "type": "yes/no", "question": "is there a circle?", "image": "1.png"},
    "3": {"answer": "no", "type": "yes/no", "question": "is there a square?", "image": "1.png"},
}
EASY_ROWS = [
    (0, "The circle."),  # "circle": right
    ("1", "Blue"),  # right
    ("2", "Yes, it does."),  # the final answer "it does" != "yes": exact match
    ("3", "gray rectangle, no"),  # a described answer: its final answer "no" is right
]


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_easyvqa_score(tmp_path, fmt):
    ann = tmp_path / f"easy.{fmt}"
    if fmt == "json":
        ann.write_text(json.dumps(EASY))
    else:
        ann.write_text("".join(json.dumps({"question_id": k, **v}) + "\n" for k, v in EASY.items()))
    task = get_task("easyvqa")
    scores = task.score(read_predictions(write_answers(tmp_path / "a.jsonl", EASY_ROWS)), task.load(ann))
    # 3 of 4 right; yes/no 1 of 2
    assert scores["accuracy"] == pytest.approx(75.0)
    assert scores["by_type"] == pytest.approx({"color": 100.0, "shape": 100.0, "yes/no": 50.0})
    q = task.questions(ann)[0]
    assert (q.question_id, q.image, q.prompt) == (
        "0",
        "0.png",
        f"what shape is in the image?\n{SHORT_ANSWER}",
    )


def test_easyvqa_final_answer_is_after_the_last_comma():
    from mllm_kd.eval.tasks.easyvqa import final_answer

    assert final_answer("blue rectangle, yes") == "yes"
    assert final_answer("a, b,  no ") == "no"
    assert final_answer("circle") == "circle"
    assert final_answer("yes,") == ""  # nothing after the comma: no answer


def test_easyvqa_errors(tmp_path):
    task = get_task("easyvqa")
    ann = tmp_path / "easy.json"
    ann.write_text(json.dumps({"0": {"answer": "circle", "type": "shape"}}))
    with pytest.raises(DataError, match="question_id '7' is not in the annotations"):
        task.score(read_predictions(write_answers(tmp_path / "a.jsonl", [("7", "x")])), task.load(ann))
    with pytest.raises(DataError, match="prompts need 'question'"):
        task.questions(ann)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": "0", "answer": "x"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        task.load(bad)
