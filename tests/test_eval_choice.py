"""ScienceQA and MMBench (multiple choice) scoring on small files in the official formats."""

import csv
import json
from pathlib import Path

import pytest
from conftest import write_answers

from mllm_kd.errors import DataError
from mllm_kd.eval.core import OPTION_LETTER, read_predictions
from mllm_kd.eval.tasks import get_task


# -------------------------------------------------------------------------------------------- ScienceQA
@pytest.fixture
def sqa_dir(tmp_path):
    def prob(choices, answer, hint, image, subject, grade):
        return {
            "question": "Which one?",
            "choices": choices,
            "answer": answer,
            "hint": hint,
            "image": image,
            "subject": subject,
            "grade": grade,
        }

    problems = {
        "1": prob(["frog", "dog", "snake"], 1, "", "image.png", "natural science", "grade3"),  # IMG
        "2": prob(["yes", "no"], 0, "Read the text.", None, "language science", "grade8"),  # TXT
        "3": prob(
            ["Ohio", "Iowa", "Utah", "Alaska"],
            3,
            "Look at the map.",
            "image.png",
            "social science",
            "grade10",
        ),
        "4": prob(["hot", "cold"], 1, "", None, "natural science", "grade5"),  # no context
        "5": prob(["a", "b"], 0, "", None, "natural science", "grade1"),  # val split
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3", "4"], "val": ["5"]}))
    return tmp_path


def test_scienceqa_score(sqa_dir, tmp_path):
    rows = [
        {"question_id": "1", "text": "B"},  # right
        {"question_id": "2", "text": "Because of X. The answer is A."},  # right
        {"question_id": "3", "text": "D. Alaska"},  # right
        {"question_id": "4", "text": "b"},  # eval_science_qa.py is case-sensitive: FAILED, wrong
    ]
    task = get_task("scienceqa")
    scores = task.score(read_predictions(write_answers(tmp_path / "a.jsonl", rows)), task.load(sqa_dir))
    assert scores["accuracy"] == pytest.approx(75.0)  # 3/4
    assert scores["img_accuracy"] == pytest.approx(100.0)  # problems 1 and 3 have images, both right
    assert scores["by_context"] == pytest.approx({"IMG": 100.0, "NO": 0.0, "TXT": 100.0})  # TXT: 2, 3; NO: 4
    assert scores["by_subject"] == pytest.approx(
        {"LAN": 100.0, "NAT": 50.0, "SOC": 100.0}
    )  # NAT: 1 right, 4 wrong
    assert scores["by_grade"] == pytest.approx({"G1-6": 50.0, "G7-12": 100.0})
    assert (scores["n"], scores["n_img"], scores["missing"]) == (4, 2, 0)


def test_scienceqa_letter_beyond_choices_and_split(sqa_dir, tmp_path):
    task = get_task("scienceqa")
    # problem 4 has two choices: "C" parses but is no option
    scores = task.score(
        read_predictions(write_answers(tmp_path / "a.jsonl", [{"question_id": "4", "text": "C"}])),
        task.load(sqa_dir),
    )
    assert scores["accuracy"] == 0.0
    val = write_answers(tmp_path / "v.jsonl", [{"question_id": "5", "text": "A"}])
    with pytest.raises(DataError, match=r"question_id '5' is not in the annotations.*split test"):
        task.score(read_predictions(val), task.load(sqa_dir))
    assert task.score(read_predictions(val), task.load(sqa_dir, "val"))["accuracy"] == pytest.approx(100.0)


def test_scienceqa_questions(sqa_dir):
    qs = get_task("scienceqa").questions(sqa_dir)
    assert [q.question_id for q in qs] == ["1", "2", "3", "4"]
    assert qs[0].image == "1/image.png" and qs[1].image is None
    assert qs[0].prompt == f"Which one?\nA. frog\nB. dog\nC. snake\n{OPTION_LETTER}"
    assert qs[1].prompt == f"Context: Read the text.\nWhich one?\nA. yes\nB. no\n{OPTION_LETTER}"


# ---------------------------------------------------------------------------------------------- MMBench
HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]


def write_tsv(path: Path, rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(HEADER)
        w.writerows(rows)
    return path


@pytest.fixture
def mmb_tsv(tmp_path):
    return write_tsv(
        tmp_path / "mmbench_dev_en.tsv",
        [
            [0, "What animal?", "nan", "cat", "dog", "bird", "nan", "B", "attribute", "perception", "aW1n"],
            [
                1,
                "Which color?",
                "Look at the car.",
                "red",
                "blue",
                "green",
                "yellow",
                "D",
                "color",
                "perception",
                "aW1n",
            ],
            [2, "How many?", "nan", "1", "2", "nan", "nan", "A", "count", "reasoning", "aW1n"],
        ],
    )


def test_mmbench_llava_rounds(mmb_tsv, tmp_path):
    def ans(idx, rnd, options, chars, text):
        return {"question_id": idx, "round_id": rnd, "options": options, "option_char": chars, "text": text}

    rows = [
        # question 0 (dog = B): every rotation answered right
        ans(0, 0, ["cat", "dog", "bird"], ["A", "B", "C"], "B"),
        ans(0, 1, ["dog", "bird", "cat"], ["B", "C", "A"], "(A)"),  # shown A = dog
        ans(0, 2, ["bird", "cat", "dog"], ["C", "A", "B"], "The answer is C."),  # shown C = dog
        # question 1 (yellow = D): round 2 wrong, so the question is wrong
        ans(1, 0, ["red", "blue", "green", "yellow"], ["A", "B", "C", "D"], "D."),
        ans(1, 1, ["blue", "green", "yellow", "red"], ["B", "C", "D", "A"], "yellow"),  # option text: shown C
        ans(1, 2, ["green", "yellow", "red", "blue"], ["C", "D", "A", "B"], "A"),  # shown A = red: wrong
        ans(1, 3, ["yellow", "red", "blue", "green"], ["D", "A", "B", "C"], "A"),
        # question 2: only round 0 answered (right): incomplete
        ans(2, 0, ["1", "2"], ["A", "B"], "A"),
    ]
    task = get_task("mmbench")
    scores = task.score(read_predictions(write_answers(tmp_path / "a.jsonl", rows)), task.load(mmb_tsv))
    assert scores["accuracy"] == pytest.approx(66.67)  # questions 0 and 2 of 3
    assert scores["single_pass_accuracy"] == pytest.approx(100.0)  # round 0 of all three right
    assert scores["by_category"] == pytest.approx({"attribute": 100.0, "color": 0.0, "count": 100.0})
    assert scores["by_l2_category"] == pytest.approx({"perception": 50.0, "reasoning": 100.0})
    assert (
        scores["n"],
        scores["n_answers"],
        scores["unparsed"],
        scores["incomplete"],
        scores["missing"],
    ) == (3, 8, 0, 1, 0)


def test_mmbench_circular_rows_in_file(tmp_path):
    # MMBench's own circular copies: index + 1e6 with the options shifted and the answer letter moved
    tsv = write_tsv(
        tmp_path / "circ.tsv",
        [
            [5, "Pet?", "", "cat", "dog", "", "", "B", "c1", "l2", ""],
            [1000005, "Pet?", "", "dog", "cat", "", "", "A", "c1", "l2", ""],
            [6, "Wild?", "", "wolf", "cow", "", "", "A", "c2", "l2", ""],
            [1000006, "Wild?", "", "cow", "wolf", "", "", "B", "c2", "l2", ""],
        ],
    )
    rows = [
        {"question_id": 5, "text": "B"},
        {"question_id": 1000005, "text": "A"},  # group 5: both right
        {"question_id": 6, "text": "A"},
        # no option letter among the tokens, no "answer is", no option text: unparsed, group 6 wrong
        {"question_id": 1000006, "text": "I have no idea"},
    ]
    task = get_task("mmbench")
    scores = task.score(read_predictions(write_answers(tmp_path / "a.jsonl", rows)), task.load(tsv))
    assert scores["accuracy"] == pytest.approx(50.0)
    assert scores["single_pass_accuracy"] == pytest.approx(100.0)  # indices 5 and 6
    assert (scores["n"], scores["unparsed"], scores["incomplete"]) == (2, 1, 0)
    assert len(task.questions(tsv)) == 4  # copies already in the file: no extra rotations


def test_mmbench_questions_and_errors(mmb_tsv, tmp_path):
    task = get_task("mmbench")
    qs = task.questions(mmb_tsv)
    assert len(qs) == 3 + 4 + 2  # one per rotation
    assert qs[1].prompt == f"What animal?\nA. dog\nB. bird\nC. cat\n{OPTION_LETTER}"
    assert qs[1].extra == {"round_id": 1, "options": ["dog", "bird", "cat"], "option_char": ["B", "C", "A"]}
    assert qs[3].prompt.startswith("Look at the car.\nWhich color?\nA. red\n")
    assert qs[0].image_b64 == "aW1n"
    with pytest.raises(DataError, match="question_id 42 is not in the annotations"):
        task.score(
            read_predictions(write_answers(tmp_path / "a.jsonl", [{"question_id": 42, "text": "A"}])),
            task.load(mmb_tsv),
        )
