"""ScienceQA scored as LLaVA's eval_science_qa.py and ScienceQA's tools/evaluate_acc.py do (hand-computed)."""

import json

import pytest
from conftest import write_answers

from mllm_kd.errors import DataError
from mllm_kd.eval.core import read_predictions
from mllm_kd.eval.tasks import get_task
from mllm_kd.eval.tasks.scienceqa import parse_letter


def problem(
    answer, n_choices=3, image=None, hint="", subject="natural science", grade="grade3", topic="biology"
):
    return {
        "question": "Which?",
        "choices": [f"c{i}" for i in range(n_choices)],
        "answer": answer,
        "hint": hint,
        "image": image,
        "subject": subject,
        "grade": grade,
        "topic": topic,
    }


@pytest.fixture
def sqa(tmp_path):
    problems = {
        "1": problem(1, image="a.png"),  # B
        "2": problem(0, hint="Read.", subject="language science", grade="grade8", topic="grammar"),  # A
        "3": problem(2, image="a.png", hint="Map.", subject="social science", grade="grade10", topic="geo"),
        "4": problem(1),  # B
        "5": problem(3, n_choices=4, grade="grade7"),  # D
        "6": problem(0),  # A
        "7": problem(4, n_choices=5),  # E
        "8": problem(1, image="a.png"),  # B, never answered
        "9": problem(0, n_choices=2),  # A
        "10": problem(2, image="a.png", grade="grade12"),  # C
        "11": problem(0),  # another split
    }
    splits = {"test": [str(i) for i in range(1, 11)], "val": ["11"]}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps(splits))
    return tmp_path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("C", "C"),  # the whole text is an option
        (" A", None),  # no strip
        ("C\n", None),  # not "C", not "C. ", no "The answer is"
        ("B\nBecause it is.", None),  # the newline stays a newline
        ("B. Because it is.", "B"),  # "X. " at the start
        ("Because so. The answer is D.", "D"),  # exactly one "The answer is X" + any character
        ("The answer is E", None),  # at the very end: the unescaped "." needs a character after the letter
        ("The answer is E\n", None),  # ... and that character is not a newline
        ("The answer is A. Or The answer is B.", None),  # two matches: FAILED
        ("The answer is F.", "F"),  # [A-Z]: parsed, then no option F (see the score test)
    ],
)
def test_parse_letter_rules(text, expected):
    assert parse_letter(text) == expected


def test_score_counts_every_problem_of_the_split(sqa, tmp_path):
    rows = [
        ("1", "B"),  # right
        ("2", " A"),  # FAILED
        ("3", "C\n"),  # FAILED
        ("4", "B\nBecause it is."),  # FAILED
        ("5", "Because so. The answer is D."),  # right
        ("6", "The answer is A. Or The answer is B."),  # FAILED
        ("7", "The answer is E"),  # FAILED
        # 8 unanswered: FAILED
        ("9", "C"),  # a letter beyond the two choices: get_pred_idx -1, wrong
        ("10", "C. because"),  # right
    ]
    task = get_task("scienceqa")
    s = task.score(read_predictions(write_answers(tmp_path / "a.jsonl", rows)), task.load(sqa))
    # LLaVA: correct 1, 5, 10 over all 10 problems of the split (not over the 9 answered): 3 / 10
    assert s["accuracy"] == 30.0
    # LLaVA IMG-Accuracy: answered problems whose prompt had the image: 1 (right), 3 (wrong), 10 (right);
    # the unanswered image problem 8 had prompt "Unknown" there, so it is not in the subset: 2 / 3
    assert s["img_accuracy"] == 66.67
    assert (s["n"], s["n_img"], s["missing"]) == (10, 3, 1)
    # evaluate_acc.py: has_image over all image problems 1, 3, 8, 10 -> 2 / 4; has_text: 2, 3 -> 0 / 2;
    # no context: 4, 5, 6, 7, 9 -> 1 / 5
    assert s["by_context"] == {"IMG": 50.0, "NO": 20.0, "TXT": 0.0}
    # natural science: 1 4 5 6 7 8 9 10 -> 1, 5, 10 right: 3 / 8 = 37.5
    assert s["by_subject"] == {"LAN": 0.0, "NAT": 37.5, "SOC": 0.0}
    # grade1-6: 1 4 6 7 8 9 -> 1 / 6 = 16.666.. ; grade7-12: 2 3 5 10 -> 2 / 4
    assert s["by_grade"] == {"G1-6": 16.67, "G7-12": 50.0}
    assert s["by_topic"] == {"biology": 37.5, "geo": 0.0, "grammar": 0.0}


def test_letter_outside_the_choices_and_other_split(sqa, tmp_path):
    task = get_task("scienceqa")
    # "The answer is F." parses to F; problem 7 has 5 choices (A-E), so F is no option: wrong
    s = task.score(
        read_predictions(write_answers(tmp_path / "a.jsonl", [("7", "The answer is F.")])), task.load(sqa)
    )
    assert (s["accuracy"], s["missing"]) == (0.0, 9)
    val = read_predictions(write_answers(tmp_path / "v.jsonl", [("11", "A")]))
    with pytest.raises(
        DataError, match=r"v\.jsonl:1: question_id '11' is not in the annotations.*split test"
    ):
        task.score(val, task.load(sqa))
    assert task.score(val, task.load(sqa, "val"))["accuracy"] == 100.0  # 1 / 1


def test_missing_answer_field_names_the_problem(sqa, tmp_path):
    problems = json.loads((sqa / "problems.json").read_text())
    del problems["4"]["answer"]
    (sqa / "problems.json").write_text(json.dumps(problems))
    task = get_task("scienceqa")
    with pytest.raises(DataError, match=r"problems\.json: problem 4: missing field 'answer'"):
        task.score(read_predictions(write_answers(tmp_path / "a.jsonl", [("1", "B")])), task.load(sqa))
