"""The easy-VQA demo's fast variant (tiny models, a few hundred examples) end to end."""

import json

from mllm_kd import ablate
from mllm_kd.demo import ROLES, main


def test_quick_demo_writes_report(tmp_path):
    run = tmp_path / "demo"
    assert main(["--run-dir", str(run), "--quick"]) == 0
    report = json.loads((run / "report.json").read_text())
    for role in ROLES:
        r = report[role]
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["n"] == 120 and r["missing"] == 0  # the whole (quick) test split was answered
        assert set(r["by_type"]) == {"shape", "color", "yes/no"}
        answers = (run / "eval" / f"{role}.answers.jsonl").read_text().splitlines()
        assert len(answers) == 120
    assert report["student_kd"]["parameters"] < report["teacher"]["parameters"]
    assert report["seconds"] > 0
    md = (run / "report.md").read_text()
    assert "| teacher |" in md and "| student_kd |" in md
    for png in ("loss_curves.png", "accuracy.png"):
        assert (run / png).stat().st_size > 1000
    # the KD student's stage 3 really distilled; the baseline's stage 1 did not
    kd3 = json.loads((run / "kd/stage3/metrics.jsonl").read_text().splitlines()[0])
    base1 = json.loads((run / "baseline/stage1/metrics.jsonl").read_text().splitlines()[0])
    assert {"mdist_resp", "mdist_vis", "rdist"} <= set(kd3) and "mdist_vis" not in base1
    # a re-run skips every finished stage and evaluation
    before = (run / "kd/stage3/final/model.safetensors").stat().st_mtime_ns
    assert main(["--run-dir", str(run), "--quick"]) == 0
    assert (run / "kd/stage3/final/model.safetensors").stat().st_mtime_ns == before
    rerun = json.loads((run / "report.json").read_text())
    assert rerun["seconds"] == report["seconds"]  # nothing was redone: the total stays that of the work
    assert rerun["wall_seconds"] < report["seconds"]
    # the ablation reuses the demo's students and trains the others, two at a time
    assert (
        ablate.main(["--run-dir", str(run), "--quick", "--jobs", "2", "--only", "kd", "baseline", "no_rel"])
        == 0
    )
    table = json.loads((run / "ablation/report.json").read_text())
    assert set(table) == {"kd", "baseline", "no_rel"}
    assert table["kd"]["accuracy"] == report["student_kd"]["accuracy"]
    assert table["baseline"]["accuracy"] == report["student_baseline"]["accuracy"]
    assert not (run / "ablation/kd").exists() and not (run / "ablation/baseline").exists()
    no_rel = json.loads((run / "ablation/no_rel/stage3/metrics.jsonl").read_text().splitlines()[0])
    assert no_rel.get("rdist", 0.0) == 0.0 and no_rel["mdist_vis"] > 0
    assert "| no_rel |" in (run / "ablation/report.md").read_text()
    # another student seed next to the same teacher: the teacher is reused, not retrained
    teacher_ckpt = run / "teacher/teacher_sft/final/model.safetensors"
    before = teacher_ckpt.stat().st_mtime_ns
    run2 = tmp_path / "seed1"
    assert (
        main(["--run-dir", str(run2), "--quick", "--seed", "1", "--teacher-dir", str(run / "teacher")]) == 0
    )
    assert teacher_ckpt.stat().st_mtime_ns == before and not (run2 / "teacher").exists()
    report2 = json.loads((run2 / "report.json").read_text())
    assert report2["teacher"]["accuracy"] == report["teacher"]["accuracy"]
    kd3_seed1 = json.loads((run2 / "kd/stage3/metrics.jsonl").read_text().splitlines()[0])
    assert kd3_seed1["loss"] != kd3["loss"]  # a different student seed
