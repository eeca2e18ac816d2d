"""The easy-VQA demo's fast variant (tiny models, a few hundred examples) end to end."""

import json

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
