"""MMBench scored as VLMEvalKit's circular evaluation under its exact-matching policy (hand-computed)."""

import csv

import pytest
from conftest import write_answers

from mllm_kd.errors import DataError
from mllm_kd.eval.core import read_predictions
from mllm_kd.eval.normalize import can_infer
from mllm_kd.eval.tasks import get_task

CHOICES = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("(C)", "C"),  # marks become spaces, "C" is a token
        ("B. dog", "B"),
        ("Option A, I think", "A"),  # one letter token, among the last 4 tokens
        # one letter token but too early (index 5 of 12 tokens), then "answer is B" matches
        ("I think the answer is B because it barks loudly at night", "B"),
        # one letter token too early and no "answer is": the text is longer than twice the options' (28): none
        ("A is what I would pick for this one", None),
        ("B or D", None),  # two letter tokens, no "answer is", no option text
        ("The correct answer is **D**", "D"),  # "*" is a mark: "D" is the one letter token, the last
        ("the answer is a dog", "A"),  # VLMEvalKit's (?i) regex reads "a" as option A
        ("dog", "B"),  # option text
        ("cats", "A"),  # option text as a substring
        ("a cat or a dog", None),  # two option texts
        ("Z", "Z"),
        ("Cannot determine the answer", "Z"),  # a refusal
        ("Failed to obtain answer via API", None),
    ],
)
def test_can_infer(text, expected):
    assert can_infer(text, dict(CHOICES)) == expected


def write_tsv(path, rows):
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        w.writerows(rows)
    return path


def test_circular_groups(tmp_path):
    tsv = write_tsv(
        tmp_path / "mmb.tsv",
        [
            [1, "Pet?", "", "cat", "dog", "", "", "B", "c1", "l1", ""],
            [1000001, "Pet?", "", "dog", "cat", "", "", "A", "c1", "l1", ""],
            [2, "Wild?", "", "wolf", "cow", "", "", "A", "c1", "l1", ""],
            [1000002, "Wild?", "", "cow", "wolf", "", "", "B", "c1", "l1", ""],
            [3, "Sea?", "", "fish", "goat", "", "", "A", "c2", "l1", ""],
            [1000003, "Sea?", "", "goat", "fish", "", "", "B", "c2", "l1", ""],
            [4, "Sky?", "", "bird", "mole", "", "", "A", "c2", "l1", ""],
            [1000004, "Sky?", "", "mole", "bird", "", "", "B", "c2", "l1", ""],
        ],
    )
    rows = [
        {"question_id": 1, "text": "B"},
        {"question_id": 1000001, "text": "dog"},  # option text: A here; group 1 right
        {"question_id": 2, "text": "A"},
        {"question_id": 1000002, "text": "I have no idea"},  # unparsed: group 2 wrong (no judge)
        {"question_id": 3, "text": "Cannot determine the answer"},  # "Z": group 3 wrong
        {"question_id": 1000003, "text": "B"},
        {"question_id": 1000004, "text": "B"},  # original 4 unanswered: VLMEvalKit leaves group 4 out
    ]
    task = get_task("mmbench")
    s = task.score(read_predictions(write_answers(tmp_path / "a.jsonl", rows)), task.load(tsv))
    # groups 1 2 3 scored, only 1 right -> 1 / 3; vanilla on originals 1 2 3: 1 and 2 right -> 2 / 3
    assert (s["accuracy"], s["single_pass_accuracy"]) == (33.33, 66.67)
    assert s["by_category"] == {"c1": 50.0, "c2": 0.0}
    assert (s["n"], s["n_answers"], s["unparsed"], s["incomplete"], s["missing"]) == (3, 7, 1, 0, 1)


def test_llava_rounds_compare_in_the_shown_letters(tmp_path):
    tsv = write_tsv(tmp_path / "mmb.tsv", [[0, "Pet?", "", "cat", "dog", "bird", "", "B", "c", "l", ""]])

    def ans(rnd, options, chars, text):
        return {"question_id": 0, "round_id": rnd, "options": options, "option_char": chars, "text": text}

    rows = [
        ans(0, ["cat", "dog", "bird"], ["A", "B", "C"], "B"),
        ans(1, ["dog", "bird", "cat"], ["B", "C", "A"], "The answer is A"),  # shown A = dog
        ans(2, ["bird", "cat", "dog"], ["C", "A", "B"], "B"),  # shown B = cat: wrong
    ]
    task = get_task("mmbench")
    s = task.score(read_predictions(write_answers(tmp_path / "a.jsonl", rows)), task.load(tsv))
    assert (s["accuracy"], s["single_pass_accuracy"], s["incomplete"]) == (0.0, 100.0, 0)
    rows[2]["text"] = "C"  # shown C = dog: every round right
    s = task.score(read_predictions(write_answers(tmp_path / "b.jsonl", rows)), task.load(tsv))
    assert s["accuracy"] == 100.0
    bad = [ans(0, ["cat", "dog"], ["A", "C"], "B")]  # the row's answer B is not among the shown letters
    with pytest.raises(DataError, match=r"c\.jsonl:1: 'options'/'option_char' do not match row 0"):
        task.score(read_predictions(write_answers(tmp_path / "c.jsonl", bad)), task.load(tsv))
