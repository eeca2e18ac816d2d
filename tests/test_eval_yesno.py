"""POPE and MME scoring on small files in the official layouts."""

import json
from pathlib import Path

import pytest
from conftest import write_answers

from mllm_kd.errors import DataError
from mllm_kd.eval.core import SHORT_ANSWER, read_predictions
from mllm_kd.eval.tasks import get_task

# ------------------------------------------------------------------------------------------------- POPE
POPE = {
    "adversarial": [("dog", "yes"), ("cat", "no"), ("car", "yes"), ("bus", "no")],
    "random": [("dog", "yes"), ("tree", "no"), ("car", "yes"), ("kite", "no")],
}
# (split, question_id, answer): adversarial gives TP, TN, FN, FP; random TP, FP ("NO" parses as yes), TP, TN
POPE_ANSWERS = [
    ("adversarial", 1, "Yes, there is a dog."),
    ("adversarial", 2, "No, there is not."),
    ("adversarial", 3, "There is no car in the image."),
    ("adversarial", 4, "Yes"),
    ("random", 1, "Yes."),
    ("random", 2, "NO"),
    ("random", 3, "yes"),
    ("random", 4, "I do not see one."),
]


@pytest.fixture
def pope_dir(tmp_path):
    d = tmp_path / "coco"
    d.mkdir()
    for split, items in POPE.items():
        lines = [
            {
                "question_id": i + 1,
                "image": "COCO_val2014_000000000001.jpg",
                "text": f"Is there a {obj} in the image?",
                "label": label,
            }
            for i, (obj, label) in enumerate(items)
        ]
        (d / f"coco_pope_{split}.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


def check_pope(scores):
    adv, rnd = scores["splits"]["adversarial"], scores["splits"]["random"]
    # adversarial TP=FP=TN=FN=1: everything 1/2
    assert adv == pytest.approx(
        {"accuracy": 50.0, "precision": 50.0, "recall": 50.0, "f1": 50.0, "yes_ratio": 50.0, "n": 4}
    )
    # random TP=2 FP=1 TN=1 FN=0: acc 3/4, precision 2/3, recall 1, F1 2*(2/3)/(5/3) = 0.8, yes 3/4
    assert rnd == pytest.approx(
        {"accuracy": 75.0, "precision": 66.67, "recall": 100.0, "f1": 80.0, "yes_ratio": 75.0, "n": 4}
    )
    assert scores["f1"] == pytest.approx(65.0)  # (50 + 80) / 2
    assert scores["accuracy"] == pytest.approx(62.5)


def test_pope_score(pope_dir, tmp_path):
    rows = [
        # adversarial by "split/id", random by metadata.category with the bare id
        {"question_id": f"{s}/{q}", "text": t}
        if s == "adversarial"
        else {"question_id": q, "text": t, "metadata": {"category": s}}
        for s, q, t in POPE_ANSWERS
    ]
    task = get_task("pope")
    scores = task.score(read_predictions(write_answers(tmp_path / "a.jsonl", rows)), task.load(pope_dir))
    check_pope(scores)
    assert (scores["n"], scores["missing"]) == (8, 0)
    q = task.questions(pope_dir)[0]
    assert (q.question_id, q.prompt) == ("adversarial/1", f"Is there a dog in the image?\n{SHORT_ANSWER}")


def test_pope_llava_ids(pope_dir, tmp_path):
    # LLaVA's llava_pope_test.jsonl renumbers the questions; they are matched on image + question text.
    llava = [
        {
            "question_id": 100 + i,
            "image": "COCO_val2014_000000000001.jpg",
            "text": f"Is there a {POPE[s][q - 1][0]} in the image?\n{SHORT_ANSWER}",
            "category": s,
        }
        for i, (s, q, _) in enumerate(POPE_ANSWERS)
    ]
    (pope_dir / "llava_pope_test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in llava))
    rows = [{"question_id": 100 + i, "text": t} for i, (_, _, t) in enumerate(POPE_ANSWERS)]
    task = get_task("pope")
    check_pope(task.score(read_predictions(write_answers(tmp_path / "a.jsonl", rows)), task.load(pope_dir)))


def test_pope_one_split(pope_dir, tmp_path):
    task = get_task("pope")
    rows = [{"question_id": f"{s}/{q}", "text": t} for s, q, t in POPE_ANSWERS]
    scores = task.score(
        read_predictions(write_answers(tmp_path / "a.jsonl", rows)), task.load(pope_dir, "random")
    )
    assert list(scores["splits"]) == ["random"]
    assert scores["f1"] == pytest.approx(80.0)
    assert scores["skipped_other_splits"] == 4  # the adversarial answers
    # with a single split loaded, bare ids are enough
    bare = [{"question_id": q, "text": t} for s, q, t in POPE_ANSWERS if s == "random"]
    scores = task.score(
        read_predictions(write_answers(tmp_path / "c.jsonl", bare)), task.load(pope_dir, "random")
    )
    assert scores["f1"] == pytest.approx(80.0)
    with pytest.raises(DataError, match="question_id 9"):
        task.score(
            read_predictions(write_answers(tmp_path / "b.jsonl", [{"question_id": 9, "text": "yes"}])),
            task.load(pope_dir, "random"),
        )


# -------------------------------------------------------------------------------------------------- MME
YN = "Please answer yes or no."


@pytest.fixture
def mme_dir(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"

    def put(folder: Path, stem: str, ext: str, qas: list[tuple[str, str]]):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}{ext}").write_bytes(b"img")
        return "".join(f"{q} {YN}\t{a}\n" for q, a in qas)

    ex = root / "existence"  # flat layout: image and txt side by side
    (ex / "0001.txt").write_text(
        put(
            ex,
            "0001",
            ".jpg",
            [("Is there a dog in this image?", "Yes"), ("Is there a cat in this image?", "No")],
        )
    )
    (ex / "0002.txt").write_text(
        put(
            ex,
            "0002",
            ".jpg",
            [("Is there a car in this image?", "Yes"), ("Is there a bus in this image?", "No")],
        )
    )
    art = root / "artwork"  # nested layout: images/ + questions_answers_YN/
    txt = put(
        art / "images",
        "10002",
        ".jpg",
        [("Is this artwork created by Monet?", "Yes"), ("Is this artwork created by Picasso?", "No")],
    )
    (art / "questions_answers_YN").mkdir()
    (art / "questions_answers_YN" / "10002.txt").write_text(txt)
    code = root / "code_reasoning"
    (code / "0020.txt").write_text(
        put(code, "0020", ".png", [("Is the output 5?", "Yes"), ("Is the output 6?", "No")])
    )
    return root


def test_mme_score(mme_dir, tmp_path):
    def ans(qid, question, text, yn=True):
        return {
            "question_id": qid,
            "prompt": f"{question}{' ' + YN if yn else ''}\n{SHORT_ANSWER}",
            "text": text,
        }

    rows = [
        ans("existence/0001.jpg", "Is there a dog in this image?", "Yes"),  # right
        ans(
            "existence/0001.jpg", "Is there a cat in this image?", "No, there is no cat."
        ),  # "no, " -> no: right
        ans("existence/0002.jpg", "Is there a car in this image?", "yes"),  # right
        ans("existence/0002.jpg", "Is there a bus in this image?", "There is a bus."),  # "other": wrong
        ans("artwork/10002.jpg", "Is this artwork created by Monet?", "Yes."),  # right
        # LLaVA's converter re-adds a missing "Please answer yes or no."; the answer is wrong
        ans("artwork/10002.jpg", "Is this artwork created by Picasso?", "yes", yn=False),
        ans("code_reasoning/0020.png", "Is the output 5?", "Yes"),
        ans("code_reasoning/0020.png", "Is the output 6?", "No"),
    ]
    task = get_task("mme")
    scores = task.score(read_predictions(write_answers(tmp_path / "a.jsonl", rows)), task.load(mme_dir))
    subs = scores["subtasks"]
    # existence: acc 3/4, acc+ 1/2 (image 0001 both right) -> 75 + 50 = 125
    assert subs["existence"] == pytest.approx(
        {"accuracy": 75.0, "accuracy_plus": 50.0, "score": 125.0, "n": 4}
    )
    # artwork: acc 1/2, acc+ 0 -> 50; code_reasoning: 100 + 100
    assert subs["artwork"]["score"] == pytest.approx(50.0)
    assert subs["code_reasoning"]["score"] == pytest.approx(200.0)
    assert scores["perception"] == pytest.approx(175.0)  # existence + artwork
    assert scores["cognition"] == pytest.approx(200.0)
    assert (scores["n"], scores["missing"]) == (8, 0)


def test_mme_questions_and_errors(mme_dir, tmp_path):
    task = get_task("mme")
    qs = task.questions(mme_dir)
    assert len(qs) == 8
    art = next(q for q in qs if q.question_id == "artwork/10002.jpg")
    assert art.image == "artwork/images/10002.jpg"
    assert art.prompt == f"Is this artwork created by Monet? {YN}\n{SHORT_ANSWER}"
    wrong = write_answers(
        tmp_path / "a.jsonl", [{"question_id": "artwork/10002.jpg", "prompt": "Is it by Dali?", "text": "no"}]
    )
    with pytest.raises(DataError, match=r"a\.jsonl:1: question_id 'artwork/10002.jpg' with prompt"):
        task.score(read_predictions(wrong), task.load(mme_dir))
    (mme_dir / "count").mkdir()
    (mme_dir / "count" / "0001.txt").write_text("How many? Yes\n")  # no tab
    with pytest.raises(DataError, match=r"0001\.txt:1: expected 'question<TAB>Yes\|No'"):
        task.load(mme_dir)
