"""The teacher's answers to unlabelled questions (mllm_kd.teacher.label): what is written, what is refused,
when earlier answers are reused."""

import json

import pytest

from mllm_kd.errors import DataError
from mllm_kd.teacher.label import label_records, labelled_by, main, questions_of, read_slice


def _records(data, n, start=0):
    records = json.loads((data / "instruct.json").read_text())[start : start + n]
    assert len(records) == n
    # a label the teacher cannot produce: the output must not carry it
    return [
        {**r, "conversations": [r["conversations"][0], {"from": "gpt", "value": "LABEL-0"}]} for r in records
    ]


def _answers(out):
    rows = [json.loads(line) for line in out.with_suffix(".answers.jsonl").read_text().splitlines()]
    return {row["question_id"]: row["text"] for row in rows}


def test_the_written_records_hold_the_teachers_answers_not_the_labels(smoke_teacher, tmp_path):
    data, teacher = smoke_teacher / "data", smoke_teacher / "teacher_sft"
    records = _records(data, 6)
    out = label_records(teacher, records, data / "images", tmp_path / "t.json", progress=False)
    written = json.loads(out.read_text())
    answers = _answers(out)
    assert [r["id"] for r in written] == [r["id"] for r in records]  # the input's order
    for rec, source in zip(written, records):
        human, gpt = rec["conversations"]
        assert human == source["conversations"][0] and rec["image"] == source["image"]
        assert gpt["from"] == "gpt" and gpt["value"] == answers[rec["id"]] != "LABEL-0"
    assert labelled_by(out, teacher, records)
    assert not labelled_by(out, teacher, records[:5])  # other questions
    # a record with no answer at all is a question like the others
    bare = [{**records[0], "conversations": records[0]["conversations"][:1]}]
    again = label_records(teacher, bare, data / "images", tmp_path / "bare.json", progress=False)
    assert json.loads(again.read_text())[0]["conversations"][1]["value"] == answers[records[0]["id"]]


def test_a_rerun_reuses_the_answers_and_other_questions_start_over(smoke_teacher, tmp_path):
    data, teacher = smoke_teacher / "data", smoke_teacher / "teacher_sft"
    records = _records(data, 4)
    out = tmp_path / "t.json"
    label_records(teacher, records, data / "images", out, progress=False)
    answers = out.with_suffix(".answers.jsonl")
    # a planted answer survives a rerun for the same teacher and questions (nothing is generated again) ...
    lines = answers.read_text().splitlines()
    planted = {**json.loads(lines[0]), "text": "PLANTED"}
    answers.write_text("\n".join([json.dumps(planted), *lines[1:]]) + "\n")
    label_records(teacher, records, data / "images", out, progress=False)
    by_id = {r["id"]: r["conversations"][1]["value"] for r in json.loads(out.read_text())}
    assert by_id[planted["question_id"]] == "PLANTED"
    # ... and is dropped when the questions change
    label_records(teacher, records[:3], data / "images", out, progress=False)
    assert "PLANTED" not in out.read_text() and len(json.loads(out.read_text())) == 3


@pytest.mark.parametrize(
    "record, said",
    [
        ({"id": "a", "image": "x.png"}, "'a' has no conversations"),
        (
            {"id": "b", "image": "x.png", "conversations": [{"from": "human", "value": "q"}] * 3},
            "'b': the teacher answers one question per record",
        ),
        ({"id": "c", "conversations": [{"from": "human", "value": "q"}]}, "'c' needs one image path"),
    ],
)
def test_records_it_cannot_answer_are_named(record, said):
    with pytest.raises(DataError, match=said):
        questions_of([record], "f.json")


def test_a_slice_outside_the_file_is_refused_naming_it(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"id": str(i)} for i in range(5)]))
    assert [r["id"] for r in read_slice(path, 3, 2)] == ["3", "4"]
    with pytest.raises(DataError, match=r"holds 5 samples: records 4\.\.6"):
        read_slice(path, 4, 2)
    code = main(
        ["--teacher", str(tmp_path), "--data", str(path), "--start", "9", "--out", str(tmp_path / "o")]
    )
    assert code != 0 and "r.json holds 5 samples" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
