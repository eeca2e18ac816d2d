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
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    first = records[0]["id"]
    # a planted answer to the first record survives a rerun for the same teacher and questions (nothing is
    # generated again) ...
    planted = [{**r, "text": "PLANTED"} if r["question_id"] == first else r for r in rows]
    answers.write_text("".join(json.dumps(r) + "\n" for r in planted))
    label_records(teacher, records, data / "images", out, progress=False)
    by_id = {r["id"]: r["conversations"][1]["value"] for r in json.loads(out.read_text())}
    assert by_id[first] == "PLANTED"
    # ... a partly answered file is completed, not redone ...
    answers.write_text(json.dumps({**rows[0], "text": "KEPT"}) + "\n")
    label_records(teacher, records, data / "images", out, progress=False)
    by_id = {r["id"]: r["conversations"][1]["value"] for r in json.loads(out.read_text())}
    assert by_id[rows[0]["question_id"]] == "KEPT" and len(answers.read_text().splitlines()) == 4
    # ... and other questions (or another answer length) start over: every answer generated anew
    planted = [{**r, "text": "PLANTED"} for r in rows]
    answers.write_text("".join(json.dumps(r) + "\n" for r in planted))
    label_records(teacher, records[:3], data / "images", out, progress=False)
    assert "PLANTED" not in out.read_text() and len(json.loads(out.read_text())) == 3
    assert len(answers.read_text().splitlines()) == 3
    assert not labelled_by(out, teacher, records[:3], max_new_tokens=4)


def test_an_interrupted_relabelling_never_leaves_the_old_file_in_use(smoke_teacher, tmp_path, monkeypatch):
    """Other questions: the old transfer file goes before any answering, so a run that stops midway leaves
    nothing that looks finished."""
    import mllm_kd.model.generate as generate

    data, teacher = smoke_teacher / "data", smoke_teacher / "teacher_sft"
    records = _records(data, 4)
    out = tmp_path / "t.json"
    label_records(teacher, records, data / "images", out, progress=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "answer_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        label_records(teacher, records[1:], data / "images", out, progress=False)
    assert not out.exists()
    assert not labelled_by(out, teacher, records) and not labelled_by(out, teacher, records[1:])


def test_a_stage_directory_answers_as_its_final_checkpoint(smoke_teacher, tmp_path):
    """The stage directory (``--teacher runs/x/teacher_sft``) prompts with its final checkpoint's system
    prompt, not the default."""
    import shutil

    import torch
    import yaml

    from mllm_kd.checkpoint.generator import checkpoint_generator
    from mllm_kd.checkpoint.integrity import write_manifest

    stage = tmp_path / "teacher_sft"
    shutil.copytree(smoke_teacher / "teacher_sft" / "final", stage / "final")
    config = yaml.safe_load((stage / "final/config.yaml").read_text())
    config["data"]["system_prompt"] = "Answer briefly."
    (stage / "final/config.yaml").write_text(yaml.safe_dump(config))
    write_manifest(stage / "final")
    assert checkpoint_generator(stage, torch.device("cpu")).encoder.system_prompt == "Answer briefly."


@pytest.mark.parametrize(
    "record, said",
    [
        ({"id": "a", "image": "x.png"}, "'a' has no conversations"),
        (
            {"id": "b", "image": "x.png", "conversations": [{"from": "human", "value": "q"}] * 3},
            "'b': the teacher answers one question per record",
        ),
        ({"id": "c", "conversations": [{"from": "human", "value": "q"}]}, "'c' needs one image path"),
        (
            {"id": "d", "image": "x.png", "conversations": [{"from": "human", "value": "q"}]},
            "'d': its question has no <image> placeholder",
        ),
        (
            {"id": "e", "image": "x.png", "conversations": [{"from": "human", "value": "<image>q"}, "a"]},
            "'e' has no conversations",
        ),
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
