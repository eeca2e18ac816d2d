"""The easy-VQA demo's fast variant (tiny models, a few hundred examples) end to end, for both recipes."""

import json

import pytest

from mllm_kd import ablate
from mllm_kd.demo import ROLES, STUDENTS, main, yes_no_prior


def _report(run):
    return json.loads((run / "report.json").read_text())


def test_quick_scratch_demo_writes_report(tmp_path):
    run = tmp_path / "demo"
    assert main(["--run-dir", str(run), "--recipe", "scratch", "--quick", "--seeds", "0"]) == 0
    report = _report(run)
    assert report["recipe"] == "scratch" and report["seeds"] == [0]
    for role in ROLES:
        r = report[role]
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["n"] == 120 and r["missing"] == 0  # the whole (quick) test split was answered
        assert set(r["by_type"]) == {"shape", "color", "yes/no"}
        assert set(r["yes_no_prior"]) >= {"accuracy", "agreement"}
        key = role if role == "teacher" else f"{role}-seed0"
        assert len((run / "eval" / "test" / f"{key}.answers.jsonl").read_text().splitlines()) == 120
    assert report["student_kd"]["parameters"] < report["teacher"]["parameters"]
    assert report["seconds"] > 0
    # the compute-matched student: the baseline's own PT, then SFT for stage2 + stage3's steps
    matched = json.loads((run / "seed0/matched/stage2/final/trainer_state.json").read_text())
    kd_sft = json.loads((run / "seed0/kd/stage2/final/trainer_state.json").read_text())
    kd_dft = json.loads((run / "seed0/kd/stage3/final/trainer_state.json").read_text())
    assert matched["step"] == kd_sft["step"] + kd_dft["step"]
    assert not (run / "seed0/matched/stage1").exists()
    base_pt = json.loads((run / "seed0/baseline/stage1/final/trainer_state.json").read_text())["elapsed"]
    assert report["student_matched"]["train_seconds"] == pytest.approx(base_pt + matched["elapsed"], abs=0.2)
    md = (run / "report.md").read_text()
    assert all(f"| {role} |" in md for role in ROLES)
    for png in ("loss_curves.png", "accuracy.png"):
        assert (run / png).stat().st_size > 1000
    # the KD student's stage 3 really distilled; the baseline's stage 1 did not
    kd3 = json.loads((run / "seed0/kd/stage3/metrics.jsonl").read_text().splitlines()[0])
    base1 = json.loads((run / "seed0/baseline/stage1/metrics.jsonl").read_text().splitlines()[0])
    assert {"mdist_resp", "mdist_vis", "rdist"} <= set(kd3) and "mdist_vis" not in base1
    # a re-run skips every finished stage and evaluation
    before = (run / "seed0/kd/stage3/final/model.safetensors").stat().st_mtime_ns
    assert main(["--run-dir", str(run), "--recipe", "scratch", "--quick", "--seeds", "0"]) == 0
    assert (run / "seed0/kd/stage3/final/model.safetensors").stat().st_mtime_ns == before
    rerun = _report(run)
    assert rerun["seconds"] == report["seconds"]  # nothing was redone: the total stays that of the work
    assert rerun["wall_seconds"] < report["seconds"]
    # the ablation reuses the demo's students and trains the others, two at a time
    only = ["kd", "baseline", "baseline_matched", "no_rel"]
    assert (
        ablate.main(["--run-dir", str(run), "--recipe", "scratch", "--quick", "--jobs", "2", "--only", *only])
        == 0
    )
    table = json.loads((run / "ablation/report.json").read_text())
    assert set(table) == set(only)
    assert table["kd"]["accuracy"] == report["student_kd"]["accuracy"]
    assert table["baseline_matched"]["accuracy"] == report["student_matched"]["accuracy"]
    assert not (run / "ablation/seed0/kd").exists() and not (run / "ablation/seed0/baseline").exists()
    no_rel = json.loads((run / "ablation/seed0/no_rel/stage3/metrics.jsonl").read_text().splitlines()[0])
    assert no_rel.get("rdist", 0.0) == 0.0 and no_rel["mdist_vis"] > 0
    assert "| no_rel |" in (run / "ablation/report.md").read_text()


def test_quick_pretrained_demo_two_seeds_share_the_teacher(tmp_path):
    """The pretrained recipe's shape (torchvision tower, a layer-subset student) with tiny random parts."""
    run = tmp_path / "demo"
    assert (
        main(["--run-dir", str(run), "--quick", "--seeds", "0,1", "--split", "val", "--questions", "40"]) == 0
    )
    report = _report(run)
    assert report["recipe"] == "pretrained" and report["split"] == "val" and report["seeds"] == [0, 1]
    val = json.loads((run / "data/val_answers.json").read_text())
    assert report["teacher"]["n"] == len(val) > 0
    for role in STUDENTS:
        r = report[role]
        seeds = r["seeds"]
        assert set(seeds) == {"0", "1"}
        accs = [seeds[s]["accuracy"] for s in ("0", "1")]
        assert r["accuracy"] == pytest.approx(sum(accs) / 2) and r["spread"] == pytest.approx(
            max(accs) - min(accs)
        )
    teacher = (run / "teacher/teacher_sft/final/model.yaml").read_text()
    assert "backend: torchvision" in teacher and "feature_node: features.16" in teacher
    student = (run / "seed0/kd/stage3/final/model.yaml").read_text()
    assert "num_hidden_layers: 2" in student  # keep_layers [0, 2] of the 3-layer teacher LLM
    # the two seeds really differ, and both distilled from the one teacher
    losses = [
        json.loads((run / f"seed{s}/kd/stage3/metrics.jsonl").read_text().splitlines()[0]) for s in (0, 1)
    ]
    assert losses[0]["loss"] != losses[1]["loss"] and all(row["mdist_resp"] > 0 for row in losses)
    # --questions sizes every SFT/DFT stage (40 questions at batch 8: 5 steps); pre-training keeps 48
    steps = {
        path: json.loads((run / path / "final/trainer_state.json").read_text())["step"]
        for path in (
            "teacher/teacher_sft",
            "seed0/kd/stage2",
            "seed0/kd/stage3",
            "seed0/kd/stage1",
            "seed1/matched/stage2",
        )
    }
    assert steps == {
        "teacher/teacher_sft": 5,
        "seed0/kd/stage2": 5,
        "seed0/kd/stage3": 5,
        "seed0/kd/stage1": 6,
        "seed1/matched/stage2": 10,
    }
    g = report["gaps"]
    assert g["kd_minus_matched"] == pytest.approx(
        100 * (report["student_kd"]["accuracy"] - report["student_matched"]["accuracy"]), abs=0.01
    )


def test_yes_no_prior_is_the_template_majority():
    from mllm_kd.data_prep.easyvqa import Question, template_prior

    train = [
        Question(0, "is there a red shape?", "no", 0),
        Question(1, "is there a blue shape?", "no", 1),
        Question(2, "is there a teal shape?", "yes", 2),  # template "is there a {color} shape?": no 2-1
        Question(3, "does the image not contain a circle?", "yes", 3),  # its own template: yes
        Question(4, "what color is the shape?", "red", 4),  # not yes/no: no template
    ]
    prior = template_prior(train)
    assert prior == {"is there a {color} shape?": "no", "does the image not contain a {shape}?": "yes"}
    questions = [
        {"question_id": "1", "text": "is there a green shape?\nAnswer."},  # prior no, truth yes
        {"question_id": "2", "text": "is there a gray shape?\nAnswer."},  # prior no, truth no
        {
            "question_id": "3",
            "text": "does the image not contain a triangle?\nAnswer.",
        },  # prior yes, truth yes
        {"question_id": "4", "text": "what shape is it?\nAnswer."},
    ]
    truth = {k: {"answer": v} for k, v in {"1": "yes", "2": "no", "3": "yes", "4": "circle"}.items()}

    class P:
        def __init__(self, qid, text):
            self.question_id, self.text = qid, text

    said = [P("1", "No."), P("2", "no"), P("3", "no"), P("4", "circle")]
    out = yes_no_prior(prior, truth, questions, said)
    # prior right on q2, q3 (2 of 3); the model agrees with it on q1, q2 (2 of 3); on the one question
    # the prior gets wrong (q1) the model is wrong too
    assert out == {"n": 3, "accuracy": 66.67, "agreement": 66.67, "accuracy_where_prior_wrong": 0.0}
