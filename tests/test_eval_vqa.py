"""VQAv2, VizWiz and TextVQA scoring on small files in the official formats."""

import json

import pytest
from conftest import write_answers

from mllm_kd.errors import DataError
from mllm_kd.eval.core import SHORT_ANSWER, read_predictions
from mllm_kd.eval.tasks import get_task


def vqa_answers(*answers: tuple[str, int]) -> list[dict]:
    """10 human answers in the official layout from (answer, count) pairs."""
    flat = [a for a, n in answers for _ in range(n)]
    assert len(flat) == 10
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(flat)]


# ------------------------------------------------------------------------------------------------ VQAv2
@pytest.fixture
def vqav2_dir(tmp_path):
    anns = [
        (1, "number", vqa_answers(("2", 10))),
        (2, "number", vqa_answers(("1000", 1), ("1,000", 1), ("many", 8))),
        (3, "yes/no", vqa_answers(("yes", 3), ("no", 7))),
        (4, "other", vqa_answers(("dog", 1), ("cat", 9))),
        (5, "other", vqa_answers(("its", 10))),
        (6, "other", vqa_answers(("red", 10))),  # not answered
    ]
    ann = {
        "data_subtype": "val2014",
        "annotations": [
            {"question_id": q, "image_id": 42, "question_type": "what", "answer_type": t, "answers": a}
            for q, t, a in anns
        ],
    }
    qs = {
        "data_subtype": "val2014",
        "questions": [{"question_id": q, "image_id": 42, "question": f"q{q}?"} for q, _, _ in anns],
    }
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(ann))
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(qs))
    return tmp_path


def test_vqav2_score(vqav2_dir, tmp_path):
    preds = write_answers(
        tmp_path / "answers.jsonl",
        [
            # EvalAI first ("two." -> "2"), then vqaEval.py: unanimous humans compare raw, "2" == "2": 1.0
            {"question_id": 1, "text": "Two."},
            # humans disagree, so both sides are normalised: "1000", "1,000" -> "1000", "many"; k=2: 0.6
            {"question_id": 2, "text": "1,000"},
            {"question_id": 3, "text": "Yes."},  # -> "yes", k=3: 0.9
            {"question_id": 4, "text": "The dog"},  # -> "dog", k=1: 0.3
            {"question_id": 5, "text": "it's"},  # EvalAI -> "it 's" != "its": 0.0
        ],
    )
    task = get_task("vqav2")
    scores = task.score(read_predictions(preds), task.load(vqav2_dir))
    # question 6 is unanswered: uploaded as "", 0.0. Overall (1 + 0.6 + 0.9 + 0.3 + 0 + 0) / 6 = 0.46666..
    # number (1 + 0.6) / 2; yes/no 0.9; other (0.3 + 0 + 0) / 3
    assert scores["accuracy"] == pytest.approx(46.67)
    assert scores["by_answer_type"] == pytest.approx({"number": 80.0, "yes/no": 90.0, "other": 10.0})
    assert (scores["n"], scores["missing"]) == (6, 1)


def test_vqav2_questions(vqav2_dir):
    qs = get_task("vqav2").questions(vqav2_dir)
    assert len(qs) == 6
    assert qs[0].question_id == 1
    assert qs[0].image == "COCO_val2014_000000000042.jpg"
    assert qs[0].prompt == f"q1?\n{SHORT_ANSWER}"


def test_vqav2_testdev_submission(tmp_path):
    qs = {
        "data_subtype": "test-dev2015",
        "questions": [
            {"question_id": 7, "image_id": 1, "question": "a?"},
            {"question_id": 8, "image_id": 1, "question": "b?"},
        ],
    }
    qfile = tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    qfile.write_text(json.dumps(qs))
    task = get_task("vqav2")
    data = task.load(qfile)
    assert not task.has_answers(data)
    assert (
        task.questions(qfile)[0].image == "COCO_test2015_000000000001.jpg"
    )  # test-dev images live in test2015
    preds = read_predictions(write_answers(tmp_path / "a.jsonl", [{"question_id": 7, "text": "The Two."}]))
    info = task.write_submission(preds, data, tmp_path / "upload.json")
    # every question of the split gets a row; EvalAI processing; unanswered -> ""
    assert json.loads((tmp_path / "upload.json").read_text()) == [
        {"question_id": 7, "answer": "2"},
        {"question_id": 8, "answer": ""},
    ]
    assert (info["submission_rows"], info["submission_missing"]) == (2, 1)


def test_vqav2_unknown_question_and_missing_file(vqav2_dir, tmp_path):
    task = get_task("vqav2")
    preds = read_predictions(
        write_answers(
            tmp_path / "a.jsonl", [{"question_id": 1, "text": "2"}, {"question_id": 999, "text": "x"}]
        )
    )
    with pytest.raises(DataError, match=r"a\.jsonl:2: question_id 999 is not in the annotations"):
        task.score(preds, task.load(vqav2_dir))
    with pytest.raises(DataError, match=r"nope\.json does not exist"):
        task.load(tmp_path / "nope.json")
    dup = read_predictions(
        write_answers(
            tmp_path / "d.jsonl", [{"question_id": 1, "text": "2"}, {"question_id": "1", "text": "3"}]
        )
    )
    with pytest.raises(DataError, match="answered twice"):
        task.score(dup, task.load(vqav2_dir))


# ----------------------------------------------------------------------------------------------- VizWiz
@pytest.fixture
def vizwiz_val(tmp_path):
    def item(i, answers, atype):
        return {
            "image": f"VizWiz_val_0000000{i}.jpg",
            "question": f"q{i}?",
            "answers": answers,
            "answer_type": atype,
            "answerable": int(atype != "unanswerable"),
        }

    items = [
        item(0, vqa_answers(("unanswerable", 5), ("blurry", 5)), "unanswerable"),
        item(1, vqa_answers(("coca cola", 2), ("coke", 8)), "other"),
        item(2, vqa_answers(("yes", 1), ("no", 9)), "yes/no"),
        item(3, vqa_answers(("coca-cola", 10)), "other"),
    ]
    path = tmp_path / "val.json"
    path.write_text(json.dumps(items))
    return path


def test_vizwiz_score_and_ids(vizwiz_val, tmp_path):
    rows = [
        {"question_id": "VizWiz_val_00000000.jpg", "text": "Unanswerable."},  # k=5: 1.0
        {
            "question_id": "VizWiz_val_00000001",
            "text": "Coca-Cola",
        },  # "coca cola", k=2: 0.6 (id without .jpg)
        {"question_id": 2, "text": "yes"},  # position 2 in val.json; k=1: 0.3
        # VizWiz compares with the raw human answers: "coca cola" != "coca-cola": 0.0
        {"question_id": "VizWiz_val_00000003.jpg", "text": "coca-cola"},
    ]
    task = get_task("vizwiz")
    data = task.load(vizwiz_val)
    scores = task.score(read_predictions(write_answers(tmp_path / "a.jsonl", rows)), data)
    # (1 + 0.6 + 0.3 + 0) / 4 = 0.475; other (0.6 + 0) / 2 = 0.3
    assert scores["accuracy"] == pytest.approx(47.5)
    assert scores["by_answer_type"] == pytest.approx({"other": 30.0, "unanswerable": 100.0, "yes/no": 30.0})
    task.write_submission(read_predictions(tmp_path / "a.jsonl"), data, tmp_path / "up.json")
    upload = json.loads((tmp_path / "up.json").read_text())
    assert [r["answer"] for r in upload] == ["unanswerable", "coca cola", "yes", "coca cola"]
    assert upload[0]["image"] == "VizWiz_val_00000000.jpg"


def test_vizwiz_questions_prompt(vizwiz_val):
    q = get_task("vizwiz").questions(vizwiz_val)[1]
    assert (q.question_id, q.image) == ("VizWiz_val_00000001.jpg", "VizWiz_val_00000001.jpg")
    assert (
        q.prompt
        == f"q1?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n{SHORT_ANSWER}"
    )


# ---------------------------------------------------------------------------------------------- TextVQA
def test_textvqa_score(tmp_path):
    data = {
        "dataset_name": "textvqa",
        "data": [
            {
                "question_id": 100,
                "image_id": "abc123",
                "question": "what brand is this?",
                "answers": ["Sony"] * 2 + ["sony."] * 2 + ["canon"] * 6,
            },
            {
                "question_id": 101,
                "image_id": "abc123",
                "question": "what number is on the shirt?",
                "answers": ["12"] * 2 + ["twelve"] * 8,
            },
            {
                "question_id": 102,
                "image_id": "def456",
                "question": "whose is it?",
                "answers": ["it's"] * 3 + ["its"] * 7,
            },
            {"question_id": 103, "image_id": "def456", "question": "unanswered?", "answers": ["x"] * 10},
        ],
    }
    ann = tmp_path / "TextVQA_0.5.1_val.json"
    ann.write_text(json.dumps(data))
    rows = [
        {"question_id": 100, "text": "SONY"},  # both sides -> "sony": 4 humans: 1.0
        # LLaVA style: the image id plus the question in the prompt's first line; "twelve" stays a word: k=2: 0.6
        {
            "question_id": "abc123",
            "prompt": f"What number is on the shirt?\nReference OCR token: 12\n{SHORT_ANSWER}",
            "text": "12",
        },
        {"question_id": 102, "text": "It's"},  # EvalAI: "it 's" on both sides, k=3: 0.9
    ]
    task = get_task("textvqa")
    scores = task.score(read_predictions(write_answers(tmp_path / "a.jsonl", rows)), task.load(ann))
    assert scores["accuracy"] == pytest.approx(83.33)  # (1 + 0.6 + 0.9) / 3 = 0.8333
    assert (scores["n"], scores["missing"]) == (3, 1)
    q = task.questions(ann)[0]
    assert (q.question_id, q.image, q.prompt) == (100, "abc123.jpg", f"what brand is this?\n{SHORT_ANSWER}")
