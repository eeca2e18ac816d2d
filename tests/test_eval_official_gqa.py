"""GQA scored as the GQA eval.py (LLaVA's testdev-balanced copy) after convert_gqa_for_eval.py (hand-computed)."""

import json

import pytest
from conftest import write_answers

from mllm_kd.errors import DataError
from mllm_kd.eval.core import read_predictions
from mllm_kd.eval.tasks import get_task
from mllm_kd.eval.tasks.gqa import chi_square, steps_num


def op(operation, argument=""):
    return {"operation": operation, "argument": argument, "dependencies": []}


def q(answer, structural, semantic, text, ops, group, balanced=True, detailed="relS"):
    return {
        "imageId": "n1",
        "question": text,
        "answer": answer,
        "isBalanced": balanced,
        "types": {"structural": structural, "semantic": semantic, "detailed": detailed},
        "semantic": ops,
        "groups": {"global": group, "local": None},
    }


SELECT = op("select", "table")
QUESTIONS = {
    # 2 steps: select, relate; "query: name" does not count
    "1": q(
        "left",
        "query",
        "rel",
        "Is the cup to the left?",
        [SELECT, op("relate", "x"), op("query", "name")],
        "pos",
    ),
    "2": q("left", "query", "rel", "Where is it?", [SELECT, op("relate", "y")], "pos"),
    "3": q("right", "query", "rel", "Where is the cup?", [SELECT, op("relate", "z")], "pos"),
    # "exist" ops do not count, nor anything containing "exist": "filter: existing" -> 1 step (select)
    "4": q("yes", "verify", "obj", "Is there a cup?", [SELECT, op("filter", "existing"), op("exist")], None),
    "5": q("no", "logical", "attr", "Is it red or blue?", [SELECT, op("choose name", "a|b")], None),
    "6": q("red", "query", "attr", "Which color?", [SELECT], "color", balanced=False),  # not scored
    "7": q(
        "white", "query", "attr", "Which color is it?", [SELECT], "color", detailed="Common"
    ),  # unanswered
}


@pytest.fixture
def gqa_file(tmp_path):
    path = tmp_path / "testdev_balanced_questions.json"
    path.write_text(json.dumps(QUESTIONS))
    return path


def test_steps_and_chi_square():
    assert [steps_num(QUESTIONS[k], k) for k in "12345"] == [2, 2, 2, 1, 1]
    # group g: gold left x2, right x1; predicted left x1, right x2: (1-2)^2/2 + (2-1)^2/1 = 1.5, size 3;
    # group h: gold yes x1, predicted no: (0-1)^2/1 = 1, size 1 -> (1.5 * 3 + 1 * 1) / 4 = 1.375
    gold = {"g": {"left": 2, "right": 1}, "h": {"yes": 1}}
    pred = {"g": {"left": 1, "right": 2}, "h": {"no": 1}}
    assert chi_square(gold, pred) == pytest.approx(1.375)
    assert chi_square({}, {}) is None


def test_score_and_breakdowns(gqa_file, tmp_path):
    rows = [
        ("1", "Left."),  # rstrip('.').lower(): "left", right
        ("2", " left"),  # no strip: " left" != "left", wrong
        ("3", "RIGHT.."),  # every trailing period goes: right
        ("4", "yes"),  # right
        ("5", "yes"),  # wrong
        ("6", "red"),  # unbalanced: not scored
    ]
    task = get_task("gqa")
    s = task.score(read_predictions(write_answers(tmp_path / "a.jsonl", rows)), task.load(gqa_file))
    # balanced 1 2 3 4 5 7: right 1 3 4 -> 3 / 6; binary (verify, logical) 4 5 -> 1 / 2; open 1 2 3 7 -> 2 / 4
    assert (s["accuracy"], s["binary"], s["open"]) == (50.0, 50.0, 50.0)
    assert s["by_structural_type"] == {
        "logical": {"accuracy": 0.0, "n": 1},
        "query": {"accuracy": 50.0, "n": 4},
        "verify": {"accuracy": 100.0, "n": 1},
    }
    assert s["by_semantic_type"] == {
        "attr": {"accuracy": 0.0, "n": 2},  # 5, 7
        "obj": {"accuracy": 100.0, "n": 1},
        "rel": {"accuracy": 66.67, "n": 3},  # 1 3 of 1 2 3
    }
    # steps: 1 2 3 -> 2 (2 of 3 right); 4 5 7 -> 1 (4 right)
    assert s["by_steps"] == {"1": {"accuracy": 33.33, "n": 3}, "2": {"accuracy": 66.67, "n": 3}}
    # words: 3 "Where is it?" (2, wrong); 4 "Where is the cup?" / "Is there a cup?" / "Which color is it?"
    # (3 4 right, 7 wrong); 5 "Is it red or blue?" (5, wrong); 6 "Is the cup to the left?" (1, right)
    assert s["by_words"] == {
        "3": {"accuracy": 0.0, "n": 1},
        "4": {"accuracy": 66.67, "n": 3},
        "5": {"accuracy": 0.0, "n": 1},
        "6": {"accuracy": 100.0, "n": 1},
    }
    # distribution: group pos, gold left 2 right 1, predicted "left" 1, " left" 1, "right" 1:
    # (1-2)^2/2 + (1-1)^2/1 = 0.5 over 3; group color: gold white 1, none predicted: 1 over 1
    # -> (0.5 * 3 + 1 * 1) / 4 = 0.625, / 100 = 0.00625 -> 0.01
    assert s["distribution"] == 0.01
    assert s["validity"] is None and s["plausibility"] is None  # no testdev_balanced_choices.json
    assert (s["n"], s["missing"]) == (6, 1)


def test_validity_and_plausibility_with_a_choices_file(gqa_file, tmp_path):
    choices = {k: {"valid": ["left", "right", "yes", "no"], "plausible": ["left", "yes"]} for k in QUESTIONS}
    (tmp_path / "testdev_balanced_choices.json").write_text(json.dumps(choices))
    rows = [("1", "right"), ("2", "left"), ("3", "up"), ("4", "yes"), ("5", "no"), ("7", "color")]
    task = get_task("gqa")
    s = task.score(read_predictions(write_answers(tmp_path / "a.jsonl", rows)), task.load(gqa_file))
    # valid: right left - yes no, and 7 is "Common": its group is color/material/shape, "color" is in it -> 5 / 6
    # plausible: left yes, 7 again -> 3 / 6
    assert (s["validity"], s["plausibility"]) == (83.33, 50.0)


def test_errors_name_the_question(gqa_file, tmp_path):
    task = get_task("gqa")
    with pytest.raises(DataError, match=r"a\.jsonl:1: question_id '99' is not in the annotations"):
        task.score(read_predictions(write_answers(tmp_path / "a.jsonl", [("99", "x")])), task.load(gqa_file))
    broken = dict(QUESTIONS, **{"2": {k: v for k, v in QUESTIONS["2"].items() if k != "semantic"}})
    gqa_file.write_text(json.dumps(broken))
    with pytest.raises(DataError, match=r"question 2: missing field 'semantic'"):
        task.score(
            read_predictions(write_answers(tmp_path / "b.jsonl", [("1", "left")])), task.load(gqa_file)
        )
