"""Tests for the easy-VQA converter (data_prep/easyvqa.py) and the LLaVA-format helpers it uses.

One small conversion (120 train images, 200 test questions) is shared by the module; tests that
change the output work on a copy of it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import easy_vqa
import pytest
import webdataset as wds
from PIL import Image
from transformers import AutoTokenizer

from mllm_kd.data.records import validate_record
from mllm_kd.data_prep import llava_format
from mllm_kd.data_prep.easyvqa import main, prepare_easyvqa
from mllm_kd.data_prep.easyvqa_questions import (
    COLORS,
    SHAPES,
    Label,
    Question,
    classify_image_pixels,
    described_answer,
    parse_described,
    question_template,
    recover_labels,
)
from mllm_kd.data_prep.llava_format import SHORT_ANSWER_PROMPT
from mllm_kd.errors import ConfigError, DataError
from mllm_kd.model.tokenization import IMAGE_TOKEN

N_TRAIN = 120
N_TEST = 200
SHARD_SIZE = 50
ANSWERS = easy_vqa.get_answers()
ARTIFACTS = (
    "images_train",
    "images_test",
    "captions",
    "instruct",
    "test",
    "val",
    "wds_captions",
    "wds_instruct",
    "tokenizer",
)


def _convert(out: Path, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("progress", False)
    return prepare_easyvqa(
        out, max_train_images=N_TRAIN, max_test_questions=N_TEST, shard_size=SHARD_SIZE, log=None, **kwargs
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("easyvqa")
    return out, _convert(out)


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _load(out: Path, name: str) -> list[dict[str, Any]]:
    return json.loads((out / name).read_text("utf-8"))


def test_constants_match_the_pipeline() -> None:
    assert SHORT_ANSWER_PROMPT == "Answer the question using a single word or phrase."
    assert llava_format.IMAGE_PLACEHOLDER == IMAGE_TOKEN
    assert sorted(ANSWERS) == sorted((*SHAPES, *COLORS, "yes", "no"))


def test_files_and_counts(converted: tuple[Path, dict[str, Any]]) -> None:
    out, result = converted
    assert set(result["actions"].values()) == {"wrote"}
    assert len(_load(out, "captions.json")) == N_TRAIN
    kept = _first_train_ids()
    n_questions = sum(image_id in kept for image_id in easy_vqa.get_train_questions()[2])
    assert len(_load(out, "instruct.json")) == n_questions  # one question per record by default
    assert len(list((out / "images/train").glob("*.png"))) == N_TRAIN
    lines = (out / "test_questions.jsonl").read_text("utf-8").splitlines()
    assert len(lines) == N_TEST
    assert len(json.loads((out / "test_answers.json").read_text("utf-8"))) == N_TEST
    assert len(list((out / "wds").glob("captions-*.tar"))) == -(-N_TRAIN // SHARD_SIZE)
    assert len(list((out / "wds").glob("instruct-*.tar"))) == -(-n_questions // SHARD_SIZE)
    manifest = json.loads((out / "manifest.json").read_text("utf-8"))
    assert manifest["args"]["max_train_images"] == N_TRAIN
    assert manifest["counts"]["captions.records"] == N_TRAIN
    assert manifest["counts"]["test.questions"] == N_TEST
    assert manifest["counts"]["captions.labels_pixel_disagreements"] == 0
    assert set(manifest["artifacts"]) == set(ARTIFACTS)
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["content_hash"])


def test_subset_is_first_images_by_id(converted: tuple[Path, dict[str, Any]]) -> None:
    out, _ = converted
    expected = sorted(easy_vqa.get_train_image_paths())[:N_TRAIN]
    assert [r["image"] for r in _load(out, "captions.json")] == [f"train/{i}.png" for i in expected]
    assert sorted(int(p.stem) for p in (out / "images/train").glob("*.png")) == expected


@pytest.mark.parametrize("name", ["captions.json", "instruct.json"])
def test_conversations_are_llava_format(converted: tuple[Path, dict[str, Any]], name: str) -> None:
    out, _ = converted
    records = _load(out, name)
    assert len({r["id"] for r in records}) == len(records)
    for record in records:
        assert list(record) == ["id", "image", "conversations"]
        turns = record["conversations"]
        assert len(turns) >= 2 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert sum(t["value"].count("<image>") for t in turns) == 1
        assert turns[0]["value"].startswith("<image>\n")
        with Image.open(out / "images" / record["image"]) as img:
            assert img.format == "PNG" and img.size == (64, 64)
        validate_record(record, "test")  # the shared validator agrees


def _first_train_ids() -> set[int]:
    return set(sorted(easy_vqa.get_train_image_paths())[:N_TRAIN])


def _check_instruct_turns(records: list[dict[str, Any]], per_record: int | None) -> None:
    """Records hold each kept image's questions in file order, ``per_record`` at a time (None: all)."""
    texts, answers, image_ids = easy_vqa.get_train_questions()
    expected: dict[str, list[tuple[str, str]]] = defaultdict(list)
    kept = _first_train_ids()
    for text, answer, image_id in zip(texts, answers, image_ids, strict=True):
        if image_id in kept:
            expected[f"train/{image_id}.png"].append((f"{text}\n{SHORT_ANSWER_PROMPT}", answer))
    got: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for record in records:
        turns = record["conversations"]
        assert turns[0]["value"].startswith("<image>\n")
        humans = [t["value"].removeprefix("<image>\n") for t in turns[::2]]
        gpts = [t["value"] for t in turns[1::2]]
        if per_record is None:
            assert record["id"] == f"instruct-{Path(record['image']).stem}"
        else:
            assert record["id"].startswith(f"instruct-{Path(record['image']).stem}-")
            assert len(humans) <= per_record
        got[record["image"]].extend(zip(humans, gpts, strict=True))
    assert got == expected
    if per_record is None:
        assert len(records) == len(expected)


def test_instruct_turns_are_the_image_questions(converted: tuple[Path, dict[str, Any]]) -> None:
    out, _ = converted
    records = _load(out, "instruct.json")
    assert all(len(r["conversations"]) == 2 for r in records)
    _check_instruct_turns(records, 1)


@pytest.mark.parametrize("per_record", [3, None])
def test_multi_turn_instruct_records(tmp_path: Path, per_record: int | None) -> None:
    out = tmp_path / "multi"
    _convert(out, questions_per_record=per_record)
    records = _load(out, "instruct.json")
    _check_instruct_turns(records, per_record)
    assert any(len(r["conversations"]) > 2 for r in records)
    for record in records:
        validate_record(record, "test")


def test_balance_yes_no(tmp_path: Path) -> None:
    out = tmp_path / "balanced"
    result = _convert(out, balance_yes_no=True)
    records = _load(out, "instruct.json")
    per_template: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        question = record["conversations"][0]["value"].removeprefix("<image>\n").split("\n")[0]
        answer = record["conversations"][1]["value"]
        if answer in ("yes", "no"):
            per_template[question_template(question)][answer] += 1
    assert per_template and all(c["yes"] == c["no"] for c in per_template.values())
    assert "{color}" in next(iter(per_template)) or "{shape}" in next(iter(per_template))
    kept = _first_train_ids()
    _, answers, image_ids = easy_vqa.get_train_questions()
    others = sum(a not in ("yes", "no") and i in kept for a, i in zip(answers, image_ids, strict=True))
    n_yes_no = sum(sum(c.values()) for c in per_template.values())
    assert len(records) == others + n_yes_no  # every colour and shape question is kept
    assert result["args"]["balance_yes_no"] is True
    again = tmp_path / "again"
    _convert(again, balance_yes_no=True)
    assert _load(again, "instruct.json") == records  # seeded: the same subsample every time


def test_validation_split_is_held_out_of_training(tmp_path: Path) -> None:
    out = tmp_path / "val"
    result = _convert(out, val_images=5)
    val_ids = sorted(_first_train_ids())[-5:]
    used = {r["image"] for name in ("captions.json", "instruct.json") for r in _load(out, name)}
    assert used and not used & {f"train/{i}.png" for i in val_ids}  # no record of a held-out image
    assert len(_load(out, "captions.json")) == N_TRAIN - 5
    questions = [json.loads(ln) for ln in (out / "val_questions.jsonl").read_text().splitlines()]
    answers = json.loads((out / "val_answers.json").read_text())
    texts, truth, image_ids = easy_vqa.get_train_questions()
    expected = [i for i, image in enumerate(image_ids) if image in val_ids]  # every question of those images
    assert sorted(int(q["question_id"]) for q in questions) == expected
    for q in questions:
        i = int(q["question_id"])
        assert q["image"] == f"train/{image_ids[i]}.png" and (out / "images" / q["image"]).is_file()
        assert q["text"].split("\n")[0] == texts[i] and answers[q["question_id"]]["answer"] == truth[i]
    assert result["counts"]["val.questions"] == len(expected)
    with pytest.raises(ConfigError, match="val_images=120 leaves no train images"):
        _convert(tmp_path / "bad", val_images=N_TRAIN)


def test_stratified_test_sample_keeps_each_type_share() -> None:
    from mllm_kd.data_prep.easyvqa_questions import Question, question_type, stratified_sample

    # 10 questions: 6 yes/no, 3 colour, 1 shape. A sample of 5: quotas 3.0, 1.5, 0.5 -> floors 3, 1, 0
    # with 1 left over; the largest remainders (0.5, 0.5) tie and are broken by type name: "color" < "shape".
    answers = ["yes", "no"] * 3 + ["red", "blue", "teal", "circle"]
    questions = [Question(i, f"q{i}", a, image_id=i // 2) for i, a in enumerate(answers)]
    sample = stratified_sample(questions, 5)
    kinds = Counter(question_type(q.answer) for q in sample)
    assert kinds == {"yes/no": 3, "color": 2}
    assert [(q.image_id, q.index) for q in sample] == sorted((q.image_id, q.index) for q in sample)
    assert stratified_sample(questions, 5) == sample  # the same sample every time
    assert stratified_sample(questions, 10) == questions
    with pytest.raises(ConfigError, match="test_sample=11"):
        stratified_sample(questions, 11)


def test_shuffle_orders_records_randomly_and_stably(tmp_path: Path, converted) -> None:
    out, _ = converted
    plain = _load(out, "instruct.json")
    shuffled = _load(_convert(tmp_path / "a", shuffle=True) and tmp_path / "a", "instruct.json")
    assert sorted(r["id"] for r in shuffled) == sorted(r["id"] for r in plain)  # the same records
    assert [r["id"] for r in shuffled] != [r["id"] for r in plain]
    # a prefix covers many images, where the image-ordered file's prefix covers a few
    n = len(plain) // 4
    assert len({r["image"] for r in shuffled[:n]}) > 2 * len({r["image"] for r in plain[:n]})
    assert _load(_convert(tmp_path / "b", shuffle=True) and tmp_path / "b", "instruct.json") == shuffled


def test_questions_per_record_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="questions_per_record"):
        _convert(tmp_path / "bad", questions_per_record=0)


def test_captions_match_labelled_shape_and_colour(converted: tuple[Path, dict[str, Any]]) -> None:
    out, _ = converted
    # Ground truth straight from the "what shape/colour" questions, independently of the converter.
    truth: dict[str, dict[str, str]] = defaultdict(dict)
    for text, answer, image_id in zip(*easy_vqa.get_train_questions(), strict=True):
        if text.startswith("what") and answer in SHAPES:
            truth[f"train/{image_id}.png"]["shape"] = answer
        elif text.startswith("what") and answer in COLORS:
            truth[f"train/{image_id}.png"]["color"] = answer
    checked = 0
    for record in _load(out, "captions.json"):
        caption = record["conversations"][1]["value"]
        words = re.findall(r"[a-z]+", caption.lower())
        assert len([w for w in words if w in SHAPES]) == 1, caption
        assert len([w for w in words if w in COLORS]) == 1, caption
        label = truth.get(record["image"], {})
        if "shape" in label and "color" in label:
            assert f"{label['color']} {label['shape']}" in caption, (record["image"], caption, label)
            checked += 1
    assert checked > N_TRAIN // 2
    assert len({r["conversations"][1]["value"].split()[0] for r in _load(out, "captions.json")}) > 1


def test_describe_yes_no_answers_say_what_the_image_shows(tmp_path: Path, converted) -> None:
    out, _ = converted
    plain = _load(out, "instruct.json")
    result = _convert(tmp_path / "described", describe_yes_no=True)
    described = _load(tmp_path / "described", "instruct.json")
    # the colour and shape of each image, independently of the converter: from the "what ..." questions
    truth: dict[str, dict[str, str]] = defaultdict(dict)
    for text, answer, image_id in zip(*easy_vqa.get_train_questions(), strict=True):
        if text.startswith("what"):
            truth[f"train/{image_id}.png"]["shape" if answer in SHAPES else "color"] = answer
    assert [r["id"] for r in described] == [r["id"] for r in plain]
    checked = 0
    for before, after in zip(plain, described, strict=True):
        assert after["conversations"][0] == before["conversations"][0]  # the question is unchanged
        answer, said = before["conversations"][1]["value"], after["conversations"][1]["value"]
        if answer not in ("yes", "no"):
            assert said == answer
            continue
        color, shape, final = re.fullmatch(r"(\w+) (\w+), (yes|no)", said).groups()
        assert final == answer and color in COLORS and shape in SHAPES
        label = truth[after["image"]]
        if len(label) == 2:
            assert (color, shape) == (label["color"], label["shape"]), (after, label)
            checked += 1
    assert checked > 50
    assert result["args"]["describe_yes_no"] is True
    # colour, shape and test files are those of the plain conversion
    for name in ("captions.json", "test_answers.json"):
        assert (tmp_path / "described" / name).read_bytes() == (out / name).read_bytes()
    # the option is a parameter of the instruct outputs: turning it off rebuilds them
    again = _convert(tmp_path / "described")
    assert again["actions"]["instruct"] == "wrote" and again["actions"]["captions"] == "skipped"
    assert _load(tmp_path / "described", "instruct.json") == plain


def test_checked_answers_name_what_the_question_asks_and_whether_the_image_has_it() -> None:
    blue_rectangle = Label("rectangle", "blue", "questions")
    cases = [
        ("is there not a red shape?", "yes", "blue rectangle, red absent, yes"),
        ("is there a blue shape?", "yes", "blue rectangle, blue present, yes"),
        ("is no rectangle present?", "no", "blue rectangle, rectangle present, no"),
        ("does the image contain a blue circle?", "no", "blue rectangle, blue circle absent, no"),
        ("what color is the shape?", "blue", "blue"),  # colour and shape answers stay one word
    ]
    for text, answer, want in cases:
        q = Question(0, text, answer, 7)
        assert described_answer(q, blue_rectangle, checked=True) == want
        if answer in ("yes", "no"):
            assert described_answer(q, blue_rectangle) == f"blue rectangle, {answer}"
            assert (
                parse_described(want)
                == parse_described(f"blue rectangle, {answer}")
                == ("blue", "rectangle", answer)
            )
    with pytest.raises(
        DataError, match=r"question 3 \('is there a red shape\?' -> 'yes'\) contradicts.*blue rectangle"
    ):
        described_answer(Question(3, "is there a red shape?", "yes", 7), blue_rectangle, checked=True)
    with pytest.raises(DataError, match="names no colour or shape"):
        described_answer(Question(4, "is it there?", "yes", 7), blue_rectangle, checked=True)


def test_check_yes_no_writes_checked_answers(tmp_path: Path, converted) -> None:
    out, _ = converted
    plain = _load(out, "instruct.json")
    result = _convert(tmp_path / "checked", check_yes_no=True)
    checked = _load(tmp_path / "checked", "instruct.json")
    assert result["args"]["check_yes_no"] is True and [r["id"] for r in checked] == [r["id"] for r in plain]
    n = 0
    for before, after in zip(plain, checked, strict=True):
        answer, said = before["conversations"][1]["value"], after["conversations"][1]["value"]
        if answer not in ("yes", "no"):
            assert said == answer
            continue
        color, shape, named, state, final = re.fullmatch(
            r"(\w+) (\w+), ([a-z ]+) (present|absent), (yes|no)", said
        ).groups()
        question = before["conversations"][0]["value"].split("\n")[1]
        negated = " not " in f" {question} " or " no " in f" {question} "
        assert final == answer and (state == "present") == ((answer == "yes") != negated)
        assert all(w in question for w in named.split()) and color in COLORS and shape in SHAPES
        n += 1
    assert n > 50
    assert (tmp_path / "checked" / "test_answers.json").read_bytes() == (
        out / "test_answers.json"
    ).read_bytes()


def test_test_questions_and_answers(converted: tuple[Path, dict[str, Any]]) -> None:
    out, _ = converted
    answers = json.loads((out / "test_answers.json").read_text("utf-8"))
    texts, gold, image_ids = easy_vqa.get_test_questions()
    lines = [json.loads(line) for line in (out / "test_questions.jsonl").read_text("utf-8").splitlines()]
    assert [q["question_id"] for q in lines] == list(answers)
    for q in lines:
        assert list(q) == ["question_id", "image", "text", "category"]
        index = int(q["question_id"])
        assert q["text"] == f"{texts[index]}\n{SHORT_ANSWER_PROMPT}"
        assert q["image"] == f"test/{image_ids[index]}.png"
        assert (out / "images" / q["image"]).is_file()
        answer = answers[q["question_id"]]
        assert answer["answer"] == gold[index]
        expected = "yes/no" if gold[index] in ("yes", "no") else "shape" if gold[index] in SHAPES else "color"
        assert answer["type"] == q["category"] == expected
    assert {a["type"] for a in answers.values()} == {"yes/no", "shape", "color"}


@pytest.mark.parametrize("kind", ["captions", "instruct"])
def test_shards_hold_the_json_records(converted: tuple[Path, dict[str, Any]], kind: str) -> None:
    out, _ = converted
    records = _load(out, f"{kind}.json")
    urls = [str(p) for p in sorted((out / "wds").glob(f"{kind}-*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [llava_format.sanitize_key(r["id"]) for r in records]
    for sample, record in zip(samples, records, strict=True):
        assert "." not in sample["__key__"]
        assert json.loads(sample["json"]) == record
        assert sample["png"] == (out / "images" / record["image"]).read_bytes()


def test_tokenizer_encodes_answers_as_single_tokens(converted: tuple[Path, dict[str, Any]]) -> None:
    out, result = converted
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert len(tok) == result["counts"]["tokenizer.vocab_size"] <= 1024
    for answer in ANSWERS:
        ids = tok.encode(answer, add_special_tokens=False)
        assert len(ids) == 1 and tok.decode(ids) == answer
    text = tok.apply_chat_template(
        [
            {"role": "user", "content": "<image>\nwhat color is the shape?"},
            {"role": "assistant", "content": "red"},
        ],
        tokenize=False,
    )
    tokens = tok.tokenize(text)
    assert tokens.count("<image>") == 1 and "user" in tokens and "assistant" in tokens
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_rerun_skips_and_leaves_files_alone(
    converted: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    out, first = converted
    before = _mtimes(out)
    code = main(
        [
            "--out",
            str(out),
            "--max-train-images",
            str(N_TRAIN),
            "--max-test-questions",
            str(N_TEST),
            "--shards-size",
            str(SHARD_SIZE),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == len(ARTIFACTS) and "wrote" not in printed
    assert "tokenizer vocab size" in printed
    assert _mtimes(out) == before
    second = _convert(out)
    assert set(second["actions"].values()) == {"skipped"}
    assert second["content_hash"] == first["content_hash"]


def test_rerun_repairs_and_rebuilds_only_what_changed(
    converted: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(converted[0], out)
    (out / "images/train/0.png").unlink()
    (out / "captions.json").write_text("[]", "utf-8")
    result = prepare_easyvqa(
        out, max_train_images=N_TRAIN, max_test_questions=N_TEST, shard_size=SHARD_SIZE * 2, log=None
    )
    rebuilt = {name for name, action in result["actions"].items() if action == "wrote"}
    assert rebuilt == {"images_train", "captions", "wds_captions", "wds_instruct"}
    assert (out / "images/train/0.png").is_file()
    assert len(_load(out, "captions.json")) == N_TRAIN
    # The old, smaller shards are gone, not left behind for a glob to pick up.
    assert len(list((out / "wds").glob("captions-*.tar"))) == -(-N_TRAIN // (SHARD_SIZE * 2))
    assert result["content_hash"] != converted[1]["content_hash"]  # shard layout differs
    forced = prepare_easyvqa(
        out,
        max_train_images=N_TRAIN,
        max_test_questions=N_TEST,
        shard_size=SHARD_SIZE * 2,
        force=True,
        log=None,
    )
    assert set(forced["actions"].values()) == {"wrote"}
    assert forced["content_hash"] == result["content_hash"]  # the output is deterministic


def test_conversion_shows_progress_with_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = _convert(tmp_path, progress=True)
    err = capsys.readouterr().err
    n_instruct = result["artifacts"]["instruct"]["counts"]["records"]
    # tqdm's bars: what is done, the count, rate and time left ("<" before the estimate).
    for desc, total in (
        ("copying train images", N_TRAIN),
        ("writing captions shards", N_TRAIN),
        ("writing instruct shards", n_instruct),
    ):
        assert re.search(rf"{desc}: +\d+%.*\| *\d+/{total} \[\d\d:\d\d<", err), (desc, err[-500:])
    _convert(tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""


def test_cli_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path), "--max-train-images", "0"]) == 2
    assert "max_train_images" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["--out", str(tmp_path / "file")]) == 2


def test_labels_from_negated_questions_and_pixels() -> None:
    paths = {i: Path(p) for i, p in easy_vqa.get_train_image_paths().items() if i < 60}
    texts, answers, image_ids = easy_vqa.get_train_questions()
    questions = [
        Question(i, t, a, img)
        for i, (t, a, img) in enumerate(zip(texts, answers, image_ids, strict=True))
        if img in paths
    ]
    labels, stats = recover_labels(questions, paths)
    assert stats["pixel_disagreements"] == 0 and stats["from_pixels"] > 0
    for image_id, path in paths.items():
        assert classify_image_pixels(path) == (labels[image_id].shape, labels[image_id].color)
    # Negations: "is there not a red shape?" -> "no" means red; "is no circle present?" -> "yes" rules out circle.
    image = next(iter(paths))
    made_up = [
        Question(0, "is there not a red shape?", "no", image),
        Question(1, "is no circle present?", "yes", image),
        Question(2, "is there a triangle?", "no", image),
    ]
    # Image 0 is a blue rectangle: questions that settle both override the pixels (counted, not raised).
    labels, stats = recover_labels(made_up, {image: paths[image]})
    assert (labels[image].shape, labels[image].color, labels[image].source) == (
        "rectangle",
        "red",
        "questions",
    )
    assert stats["pixel_disagreements"] == 1
    with pytest.raises(DataError, match="contradicts"):
        recover_labels(
            [*made_up, Question(3, "what color is the shape?", "blue", image)], {image: paths[image]}
        )


def test_build_artifacts_skips_rebuilds_and_resumes(tmp_path):
    """The generic piece alone: skip when key and files match; rebuild on a changed parameter, source or
    file; an artifact whose build fails leaves the ones before it recorded, so a rerun skips them."""
    from mllm_kd.data_prep.artifacts import Artifact, build_artifacts, files_named, load_manifest

    built: list[str] = []

    def artifacts(param: int, fail_b: bool = False) -> list[Artifact]:
        def build(name: str) -> dict:
            if name == "b" and fail_b:
                raise RuntimeError("b failed")
            built.append(name)
            (tmp_path / f"{name}.txt").write_text(f"{name}{param}")
            return {"n": param}

        return [
            Artifact(
                n,
                f"{n}.txt",
                {"p": param, "source": src},
                files_named(tmp_path / f"{n}.txt"),
                lambda n=n: build(n),
            )
            for n, src in (("a", "s1"), ("b", "s2"))
        ]

    manifest_path = tmp_path / "manifest.json"
    digests = {"s1": "d1", "s2": "d2"}

    def run(param: int, **kw) -> dict:
        return build_artifacts(tmp_path, manifest_path, {"args": {}}, artifacts(param, **kw), digests.get, 1)

    with pytest.raises(RuntimeError, match="b failed"):
        run(1, fail_b=True)
    assert built == ["a"] and set(load_manifest(manifest_path)["artifacts"]) == {"a"}
    assert run(1) == {"a": "skipped", "b": "wrote"} and built == ["a", "b"]
    manifest = load_manifest(manifest_path)
    assert manifest["source"] == {"s1_sha256": "d1", "s2_sha256": "d2"} and manifest["counts"] == {
        "a.n": 1,
        "b.n": 1,
    }
    assert run(1) == {"a": "skipped", "b": "skipped"}
    (tmp_path / "b.txt").write_text("edited")
    assert run(1) == {"a": "skipped", "b": "wrote"} and (tmp_path / "b.txt").read_text() == "b1"
    digests["s1"] = "changed"
    assert run(1) == {"a": "wrote", "b": "skipped"}
    assert run(2) == {"a": "wrote", "b": "wrote"}
    assert load_manifest(manifest_path)["counts"] == {"a.n": 2, "b.n": 2}
