"""VQAv2 and VizWiz scored as the official code does (hand-computed): the EvalAI answer processor LLaVA applies
before uploading, GT-Vision-Lab/VQA vqaEval.py (current and 2017) and VizWiz's own vqaEval.py."""

import json

import pytest
from conftest import write_answers

from mllm_kd.eval.core import official_pct, read_predictions
from mllm_kd.eval.normalize import (
    VIZWIZ_CONTRACTIONS,
    evalai_normalize,
    vizwiz_normalize,
    vqa_accuracy,
    vqa_accuracy_2017,
)
from mllm_kd.eval.tasks import get_task


def humans(*pairs):
    """10 human answer records (answer_id 1..10) from (answer, count) pairs."""
    flat = [a for a, n in pairs for _ in range(n)]
    assert len(flat) == 10
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(flat)]


def vqav2_file(tmp_path, anns):
    """anns: (question_id, answer_type, question_type, records)."""
    data = {
        "annotations": [
            {"question_id": q, "image_id": 1, "answer_type": at, "question_type": qt, "answers": recs}
            for q, at, qt, recs in anns
        ]
    }
    path = tmp_path / "v2_mscoco_val2014_annotations.json"
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------------------------------- the answer rules
def test_evalai_processor():
    assert evalai_normalize("red,blue") == "redblue"  # commas dropped, not spaced
    assert evalai_normalize("Dog's") == "dog 's"  # "'s" split off
    assert evalai_normalize("Is it two?") == "is it 2"  # "?" dropped, number word
    assert evalai_normalize("  An apple.\n") == "apple"  # article, period, whitespace
    assert evalai_normalize("dont") == "don't"  # VQA's straight-apostrophe table


def test_current_vqaeval_normalises_only_split_answers():
    # unanimous: raw comparison after strip; "two" != "2" (0 of 10), the 2017 code normalises the answer: 1.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy_2017("two", ["2"] * 10) == 1.0
    # split: both sides normalised, "two" -> "2" matches 4 humans -> 1.0; 2017 keeps the humans' "two"
    assert vqa_accuracy("2", ["two"] * 4 + ["3"] * 6) == 1.0
    assert vqa_accuracy_2017("2", ["two"] * 4 + ["3"] * 6) == 0.0
    # articles: unanimous "the dog" matches only the raw "the dog"
    assert vqa_accuracy("the dog", ["the dog"] * 10) == 1.0
    assert vqa_accuracy(evalai_normalize("the dog"), ["the dog"] * 10) == 0.0  # EvalAI made it "dog"
    # whitespace: the current code strips the human answers too; 2017 leaves unanimous ones raw
    assert vqa_accuracy(" yes", ["yes\n"] * 10) == 1.0
    assert vqa_accuracy_2017(" yes", ["yes\n"] * 10) == 0.0
    # contractions (split answers): "dont" -> "don't" on the prediction side, 5 humans -> min(1, 4/3 or 5/3) = 1
    assert vqa_accuracy("dont", ["don't"] * 5 + ["no"] * 5) == 1.0
    # 3 of 10: leaving out one of them leaves 2 -> 2/3 (3 times), else 3 -> 1 (7 times): (2 + 7) / 10
    assert vqa_accuracy("Yes.", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)


def test_identical_answer_records_leave_out_together():
    # vqaEval.py drops "other" humans by record equality: 3 identical "red" records (no answer_id) all go when
    # one of them is left out. Red left out: 0 reds remain -> 0 (3 times); blue left out: 3 reds -> 1 (7 times)
    recs = [{"answer": "red", "answer_confidence": "yes"}] * 3
    recs += [{"answer": "blue", "answer_confidence": "yes", "answer_id": i} for i in range(7)]
    path_free = vqa_accuracy("red", [r["answer"] for r in recs])  # by position: (3 * 2/3 + 7 * 1) / 10
    assert path_free == pytest.approx(0.9)
    identity = [tuple(sorted((k, repr(v)) for k, v in r.items() if k != "answer")) for r in recs]
    assert vqa_accuracy("red", [r["answer"] for r in recs], identity) == pytest.approx(0.7)


def test_rounding_is_python2s_for_vqa_and_python3s_for_vizwiz():
    # 1 right of 32: 100 * 1 / 32 = 3.125 exactly; Python 2's round gives 3.13, Python 3's 3.12
    assert official_pct(1, 32, py2=True) == 3.13
    assert official_pct(1, 32) == 3.12


# ----------------------------------------------------------------------------------------------- VQAv2
def test_vqav2_server_path_variants_and_breakdowns(tmp_path):
    anns = [
        (1, "number", "how many", humans(("2", 10))),
        (2, "number", "how many", humans(("two", 4), ("3", 6))),
        (3, "other", "what is", humans(("the dog", 10))),
        (4, "yes/no", "is the", humans(("yes\n", 10))),
        (5, "other", "what is", humans(("don't", 5), ("no", 5))),
        (6, "other", "what color", humans(("red", 10))),  # unanswered
    ]
    rows = [(1, "two"), (2, "2"), (3, "the dog"), (4, " yes"), (5, "dont")]
    task = get_task("vqav2")
    s = task.score(
        read_predictions(write_answers(tmp_path / "a.jsonl", rows)), task.load(vqav2_file(tmp_path, anns))
    )
    # EvalAI then vqaEval.py 2021: 1 "2"==raw "2": 1; 2 split, "2" vs "two"->"2" x4: 1; 3 "dog" vs raw "the dog":
    # 0; 4 "yes" vs stripped "yes": 1; 5 "don't" x5: 1; 6 "" : 0 -> 4 / 6 = 66.666..
    assert s["accuracy"] == 66.67
    # raw answers, vqaEval.py 2021: "two" vs "2": 0; 1; "the dog": 1; " yes" stripped: 1; "dont"->"don't": 1;
    # "": 0 -> 4 / 6. 2017: "two"->"2": 1; humans "two" kept: 0; "dog" vs "the dog": 0; "yes" vs "yes\n": 0;
    # "don't" vs processPunctuation("don't") = "don't": 1; 0 -> 2 / 6 = 33.333..
    assert s["variants"] == {"evalai+vqaeval_2021": 66.67, "vqaeval_2021": 66.67, "vqaeval_2017": 33.33}
    assert s["by_answer_type"] == {
        "number": 100.0,
        "other": 33.33,
        "yes/no": 100.0,
    }  # other: 3, 5, 6 -> 1 / 3
    assert s["by_question_type"] == {"how many": 100.0, "is the": 100.0, "what color": 0.0, "what is": 50.0}
    assert (s["n"], s["missing"]) == (6, 1)


def test_vqav2_rounds_like_python2(tmp_path):
    anns = [(q, "other", "what", humans(("cat", 10))) for q in range(32)]
    task = get_task("vqav2")
    preds = read_predictions(write_answers(tmp_path / "a.jsonl", [(0, "Cat")]))
    # "cat" right once, 31 unanswered: 100 * 1.0 / 32 = 3.125 -> 3.13 (Python 2 rounds ties away from zero)
    assert task.score(preds, task.load(vqav2_file(tmp_path, anns)))["accuracy"] == 3.13


# ---------------------------------------------------------------------------------------------- VizWiz
def test_vizwiz_contraction_table_uses_curly_apostrophes():
    assert VIZWIZ_CONTRACTIONS["dont"] == "don\u2019t"
    assert VIZWIZ_CONTRACTIONS["whats"] == "what\u2019s"
    assert VIZWIZ_CONTRACTIONS["couldnt\u2019ve"] == "couldn\u2019t\u2019ve"  # curly key as well
    assert VIZWIZ_CONTRACTIONS["couldn'tve"] == "couldn\u2019t\u2019ve"  # this key stays straight
    assert VIZWIZ_CONTRACTIONS["weve"] == "we've"  # a few expansions stay straight
    assert "couldnt've" not in VIZWIZ_CONTRACTIONS
    assert vizwiz_normalize("Dont.") == "don\u2019t"
    assert vizwiz_normalize("don't") == "don't"  # not a key: unchanged


def test_vizwiz_server_path(tmp_path):
    def item(i, pairs, atype):
        return {
            "image": f"VizWiz_val_{i:08d}.jpg",
            "question": "q?",
            "answers": humans(*pairs),
            "answer_type": atype,
        }

    items = [
        item(0, [("don\u2019t", 3), ("no", 7)], "other"),
        item(1, [("don't", 3), ("no", 7)], "other"),
        item(2, [("redblue", 2), ("red and blue", 8)], "other"),
        item(3, [("dog's", 4), ("dog", 6)], "other"),
        item(4, [("Yes", 10)], "yes/no"),
        item(5, [("unanswerable", 10)], "unanswerable"),  # unanswered
    ]
    path = tmp_path / "val.json"
    path.write_text(json.dumps(items))
    rows = [
        (f"VizWiz_val_{i:08d}.jpg", t) for i, t in enumerate(["dont", "dont", "red,blue", "dog's", "yes"])
    ]
    task = get_task("vizwiz")
    s = task.score(read_predictions(write_answers(tmp_path / "a.jsonl", rows)), task.load(path))
    # EvalAI first: "dont" -> "don't" (straight), which VizWiz's table leaves alone:
    #   0: vs raw "don’t": 0; 1: vs raw "don't" x3: 0.9; 2: "redblue" x2: 0.6; 3: "dog 's" vs "dog's": 0;
    #   4: "yes" vs raw "Yes" (human answers are not processed): 0; 5: "": 0 -> 1.5 / 6 = 25.00
    assert s["accuracy"] == 25.0
    # VizWiz's code on the raw answers: 0: "dont" -> "don’t" x3: 0.9; 1: 0; 2: "red blue": 0; 3: "dog's" x4: 1;
    #   4: 0; 5: 0 -> 1.9 / 6 = 31.666..
    assert s["variants"] == {"evalai+vizwiz": 25.0, "vizwiz": 31.67}
    assert s["by_answer_type"] == {"other": 37.5, "unanswerable": 0.0, "yes/no": 0.0}  # 1.5 / 4
    assert (s["n"], s["missing"]) == (6, 1)
