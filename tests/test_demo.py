"""The easy-VQA demo's fast variant (tiny models, a few hundred examples) end to end, for both recipes."""

import json

import pytest
import yaml
from omegaconf import OmegaConf

from mllm_kd.apps.easyvqa import ablate
from mllm_kd.apps.easyvqa.demo import main
from mllm_kd.apps.easyvqa.options import size_overrides
from mllm_kd.apps.easyvqa.report import (
    STUDENT_ROLES,
    _interval_line,
    gaps,
    paired_by_seed,
    student_roles,
    yes_no_prior,
)
from mllm_kd.apps.easyvqa.roles import RECIPES, STUDENTS, recipe_students
from mllm_kd.apps.easyvqa.teachers import QUICK_VOCAB
from mllm_kd.apps.easyvqa.training import train_role
from mllm_kd.errors import ConfigError
from mllm_kd.eval.normalize import simple_normalize


def _report(run):
    return json.loads((run / "report.json").read_text())


def _state(run, stage_dir):
    return json.loads((run / stage_dir / "final/trainer_state.json").read_text())


def _first_metrics(run, stage_dir):
    return json.loads((run / stage_dir / "metrics.jsonl").read_text().splitlines()[0])


SCRATCH_ARGS = ["--recipe", "scratch", "--quick", "--seeds", "0"]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """One quick scratch-recipe demo, run once for the tests below: ``(run_dir, exit code, report)``."""
    run = tmp_path_factory.mktemp("scratch") / "demo"
    code = main(["--run-dir", str(run), *SCRATCH_ARGS])
    return run, code, _report(run)


def test_scratch_demo_reports_every_role(scratch):
    _, code, report = scratch
    assert code == 0
    assert report["recipe"] == "scratch" and report["seeds"] == [0]
    assert not any(role in report for role in ("student_kd_tproj", "student_matched_tproj"))  # widths differ
    for role in ("teacher", *STUDENT_ROLES):
        r = report[role]
        assert set(r["by_type"]) == {"shape", "color", "yes/no"}
        assert set(r["yes_no_prior"]) >= {"accuracy", "agreement"}
    assert report["student_kd"]["parameters"] < report["teacher"]["parameters"]
    assert report["seconds"] > 0
    kd, matched = (report[f"student_{r}"]["seeds"]["0"]["accuracy"] for r in ("kd", "matched"))
    assert report["gaps"]["kd_minus_matched_by_seed"] == {"0": round(100 * (kd - matched), 2)}
    assert "sd_kd_minus_matched" not in report["gaps"]  # one seed: no spread of the differences


def _seeds(**accuracy):
    return {"seeds": {seed.lstrip("s"): {"accuracy": a} for seed, a in accuracy.items()}}


def test_paired_by_seed_differences_and_the_seeds_a_3_point_lead_needs():
    kd = _seeds(s0=0.60, s1=0.70, s2=0.50, s3=0.90)  # seed 3 has no matched run: left out
    matched = _seeds(s0=0.55, s1=0.60, s2=0.58)
    out = paired_by_seed(kd, matched)
    assert out["kd_minus_matched_by_seed"] == {"0": 5.0, "1": 10.0, "2": -8.0}
    # differences 5, 10, -8: mean 7/3, sample variance (2.667^2 + 7.667^2 + 10.333^2) / 2 = 86.33
    assert out["sd_kd_minus_matched"] == pytest.approx(9.29, abs=0.01)
    assert out["seeds_to_show_3_points"] == 76  # ((1.96 + 0.84) * 9.2916 / 3)^2 = 75.2, rounded up
    paired = out["kd_minus_matched_paired"]  # half width t975(2) * 9.2916 / sqrt(3) = 4.303 * 5.3645 = 23.08
    assert paired["ci95"] == pytest.approx([2.33 - 23.08, 2.33 + 23.08], abs=0.02)
    assert paired["p_sign_flip"] == 0.375  # 3 of 8 sign patterns sum to 7 or more
    line = _interval_line(paired)[0]
    assert "+2.33 points over 3 seeds" in line and "-20.75 to +25.41" in line and "p = 0.3750" in line
    assert paired_by_seed(_seeds(s0=0.6), _seeds(s1=0.5)) == {}  # no seed in common


@pytest.mark.parametrize("option", ["--teacher-projector", "--projected-images"])
def test_teacher_projector_is_refused_where_it_does_not_fit(tmp_path, capsys, option):
    run = tmp_path / "demo"
    assert main(["--run-dir", str(run), *SCRATCH_ARGS, option]) == 2
    assert (
        f"{option}: the easyvqa_scratch.yaml teacher's projector does not fit its student"
        in capsys.readouterr().err
    )
    assert not run.exists()


@pytest.mark.parametrize(
    ("manifest_args", "said", "asked"),
    [
        ({}, "one-word", "described"),  # older manifests lack the keys
        ({"describe_yes_no": True}, "described", "one-word"),
        ({"describe_yes_no": True, "check_yes_no": True}, "checked", "described"),
        ({"describe_yes_no": True}, "described", "checked"),
    ],
)
def test_a_run_directory_of_the_other_answer_format_is_refused(tmp_path, capsys, manifest_args, said, asked):
    run = tmp_path / "demo"
    (run / "data").mkdir(parents=True)
    (run / "data" / "manifest.json").write_text(json.dumps({"args": manifest_args}))
    # the scratch recipe's answers are one-word ones
    assert (
        main(["--run-dir", str(run), *SCRATCH_ARGS, *([] if asked == "one-word" else ["--answers", asked])])
        == 2
    )
    assert (
        f"{run}: its data and models were made with {said} yes/no answers, not {asked}"
        in capsys.readouterr().err
    )
    assert sorted(p.name for p in run.rglob("*")) == ["data", "manifest.json"]  # nothing else written


def test_scratch_demo_scores_are_the_answer_files_scored(scratch):
    """Every (quick) test question answered by every model, and the reported accuracy is exact match on
    those answers."""
    run, _, report = scratch
    truth = json.loads((run / "data/test_answers.json").read_text())
    for role in ("teacher", *STUDENT_ROLES):
        r = report[role]
        assert r["n"] == 120 and r["missing"] == 0
        key = role if role == "teacher" else f"{role}-seed0"
        rows = [
            json.loads(line) for line in (run / "eval/test" / f"{key}.answers.jsonl").read_text().splitlines()
        ]
        assert len(rows) == 120
        correct = sum(
            simple_normalize(row["text"]) == simple_normalize(str(truth[str(row["question_id"])]["answer"]))
            for row in rows
        )
        assert r["accuracy"] == pytest.approx(correct / len(rows), abs=1e-4), role


def test_compute_matched_student_trains_as_many_steps_as_sft_plus_dft(scratch):
    """The baseline's own PT, then SFT for stage2 + stage3's steps; its time counts that PT."""
    run, _, report = scratch
    matched = _state(run, "seed0/matched/stage2")
    assert matched["step"] == _state(run, "seed0/kd/stage2")["step"] + _state(run, "seed0/kd/stage3")["step"]
    assert not (run / "seed0/matched/stage1").exists()
    base_pt = _state(run, "seed0/baseline/stage1")["elapsed"]
    assert report["student_matched"]["train_seconds"] == pytest.approx(base_pt + matched["elapsed"], abs=0.2)


def test_scratch_demo_writes_the_report_and_plots(scratch):
    run, _, _ = scratch
    md = (run / "report.md").read_text()
    assert all(f"| {role} |" in md for role in ("teacher", *STUDENT_ROLES))
    for png in ("loss_curves.png", "accuracy.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (run / png).stat().st_size > 1000


def test_kd_student_distilled_and_the_baseline_did_not(scratch):
    run, _, _ = scratch
    kd3 = _first_metrics(run, "seed0/kd/stage3")
    base1 = _first_metrics(run, "seed0/baseline/stage1")
    assert {"mdist_resp", "mdist_vis", "rdist"} <= set(kd3) and "mdist_vis" not in base1


def test_scratch_demo_times_each_phase(scratch):
    _, _, report = scratch
    phases = report["phases"]
    assert list(phases)[:2] == ["data", "teacher"]
    assert {f"{role}, seed 0" for role in STUDENT_ROLES} <= set(phases)
    assert {f"evaluate {role}" for role in ("teacher",)} <= set(phases)
    assert all(v >= 0 for v in phases.values())
    assert phases["teacher"] > 0


def test_rerun_skips_every_finished_stage_and_evaluation(scratch):
    run, _, report = scratch
    before = (run / "seed0/kd/stage3/final/model.safetensors").stat().st_mtime_ns
    assert main(["--run-dir", str(run), *SCRATCH_ARGS]) == 0
    assert (run / "seed0/kd/stage3/final/model.safetensors").stat().st_mtime_ns == before
    rerun = _report(run)
    assert rerun["seconds"] == report["seconds"]  # nothing was redone: the total stays that of the work
    assert rerun["wall_seconds"] < report["seconds"]


def test_ablation_reuses_the_demo_students_and_trains_the_others(scratch):
    """Two at a time; the variants the demo already trained are read, not retrained."""
    run, _, report = scratch
    only = ["kd", "baseline", "baseline_matched", "no_rel"]
    argv = ["--run-dir", str(run), "--recipe", "scratch", "--quick", "--jobs", "2", "--only", *only]
    assert ablate.main(argv) == 0
    table = json.loads((run / "ablation/report.json").read_text())
    assert set(table) == set(only)
    assert table["kd"]["accuracy"] == report["student_kd"]["accuracy"]
    assert table["baseline_matched"]["accuracy"] == report["student_matched"]["accuracy"]
    assert not (run / "ablation/seed0/kd").exists() and not (run / "ablation/seed0/baseline").exists()
    no_rel = _first_metrics(run, "ablation/seed0/no_rel/stage3")
    assert no_rel.get("rdist", 0.0) == 0.0 and no_rel["mdist_vis"] > 0
    assert "| no_rel |" in (run / "ablation/report.md").read_text()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The pretrained recipe's shape (torchvision tower, a layer-subset student) with tiny random parts,
    two seeds, scored on the validation split, every DFT on a transfer set of 120 teacher-answered questions
    (3x the students' 40): ``(run_dir, exit code, report)``."""
    run = tmp_path_factory.mktemp("pretrained") / "demo"
    code = main(
        [
            "--run-dir",
            str(run),
            "--quick",
            "--seeds",
            "0,1",
            "--split",
            "val",
            "--questions",
            "40",
            "--teacher-projector",
            "--projected-images",
            "--transfer-questions",
            "120",
            "--seqkd",
        ]
    )
    return run, code, _report(run)


# the pretrained fixture's transfer set: 3x the students' 40 DFT questions; the roles with a DFT, or that count
# one's steps, are named by it
T = 120


def test_pretrained_demo_averages_two_seeds_on_the_validation_split(pretrained):
    run, code, report = pretrained
    assert code == 0
    assert report["recipe"] == "pretrained" and report["split"] == "val" and report["seeds"] == [0, 1]
    val = json.loads((run / "data/val_answers.json").read_text())
    assert report["teacher"]["n"] == len(val) > 0
    assert report["transfer_questions"] == T
    # dft_tproj runs over the students' SFT questions: a run with a transfer set has no such DFT to match
    trained = [r for r in STUDENTS if r != "student_dft_tproj"]
    assert student_roles(report) == trained
    for role in trained:
        r = report[role]
        seeds = r["seeds"]
        assert set(seeds) == {"0", "1"}
        accs = [seeds[s]["accuracy"] for s in ("0", "1")]
        assert r["accuracy"] == pytest.approx(sum(accs) / 2) and r["spread"] == pytest.approx(
            max(accs) - min(accs)
        )
    g = report["gaps"]
    assert g["kd_minus_matched"] == pytest.approx(
        100 * (report["student_kd"]["accuracy"] - report["student_matched"]["accuracy"]), abs=0.01
    )


def test_ablation_hidden_state_dft_maps_the_students_layers_onto_the_teachers(pretrained, tmp_path):
    """dft_hidden: the ablation's kd SFT result (the demo's kd DFTs on the transfer set: another run, not
    reused), then DFT with loss.w_hidden against the online teacher; the student's layers (keep_layers of the
    teacher's depth) are distilled towards the teacher's at that depth."""
    import shutil

    run = tmp_path / "demo"
    shutil.copytree(pretrained[0], run)
    argv = ["--run-dir", str(run), "--quick", "--seeds", "0", "--split", "val", "--questions", "40"]
    assert ablate.main([*argv, "--only", "kd", "dft_hidden"]) == 0
    config = yaml.safe_load((run / "ablation/seed0/dft_hidden/stage3/final/config.yaml").read_text())
    assert config["loss"]["w_hidden"] == 1 and config["init_from"] == f"{run}/ablation/seed0/kd/stage2"
    assert config["teacher"]["checkpoint"] and not config["teacher"].get("cache")
    assert len(config["model"]["llm"]["keep_layers"]) >= 1
    first = _first_metrics(run, "ablation/seed0/dft_hidden/stage3")
    assert first["hidden"] > 0 and first["mdist_resp"] > 0
    kd = _state(run, "ablation/seed0/kd/stage3")
    assert _state(run, "ablation/seed0/dft_hidden/stage3")["step"] == kd["step"] == 5  # the SFT questions'
    assert not (run / "seed0/kd").exists()
    table = json.loads((run / "ablation/report.json").read_text())
    assert set(table) == {"kd", "dft_hidden"} and 0 <= table["dft_hidden"]["accuracy"] <= 1


def test_tproj_students_start_from_the_teachers_projector(pretrained):
    """No stage 1: the first stage builds the student with the teacher's projector, and the compute-matched
    one trains stage2 for as many steps as the kd one's stage2 + stage3."""
    run, _, report = pretrained
    teacher = run / "teacher/teacher_sft"
    for sub, first in ((f"kd_tproj-{T}", "stage2"), (f"matched_tproj-{T}", "stage2")):
        assert not (run / "seed0" / sub / "stage1").exists()
        cfg = OmegaConf.load(run / "seed0" / sub / first / "final/config.yaml")
        assert cfg.init_from is None and cfg.model.projector.checkpoint == str(teacher)
        model = OmegaConf.load(run / "seed0" / sub / first / "final/model.yaml")
        assert model.projector.checkpoint is None  # the checkpoint stands alone
    kd = sum(_state(run, f"seed1/kd_tproj-{T}/{stage}")["step"] for stage in ("stage2", "stage3"))
    assert _state(run, f"seed1/matched_tproj-{T}/stage2")["step"] == kd == 5 + 15
    assert report["student_kd_tproj"]["stages"][0] == "projector of teacher/teacher_sft"
    g, acc = report["gaps"], {r: 100 * report[r]["accuracy"] for r in STUDENTS if r in report}
    assert g["kd_tproj_minus_matched"] == pytest.approx(
        acc["student_kd_tproj"] - acc["student_matched"], abs=0.01
    )
    assert g["kd_tproj_minus_matched_tproj"] == pytest.approx(
        acc["student_kd_tproj"] - acc["student_matched_tproj"], abs=0.01
    )
    assert "| student_kd_tproj |" in (run / "report.md").read_text()


def test_dft_tproj_trains_dfts_loss_from_the_teachers_projector_for_the_matched_steps(pretrained, tmp_path):
    """dft_tproj: no stage 1 or 2; stage 3 builds the student with the teacher's projector and trains CE + every
    term, the teacher read from the cache of the SFT questions, for the steps of SFT + DFT over them."""
    import shutil

    run = tmp_path / "demo"
    shutil.copytree(pretrained[0], run)
    spec = RECIPES["pretrained"]
    overrides = [*spec.quick, "train.progress=false", *size_overrides(40, None, None), "train.seed=0"]
    ckpt, seconds, stages = train_role(run, spec, "student_dft_tproj", overrides, False, run / "teacher", 0)
    assert ckpt == run / "seed0/dft_tproj/stage3/final" and seconds > 0
    assert stages == ["projector of teacher/teacher_sft", "stage3"]
    assert not (run / "seed0/dft_tproj/stage1").exists() and not (run / "seed0/dft_tproj/stage2").exists()
    cfg = OmegaConf.load(ckpt / "config.yaml")
    assert cfg.init_from is None and cfg.model.projector.checkpoint == str(run / "teacher/teacher_sft")
    assert cfg.teacher.cache == str(run / "teacher/cache/stage3") and cfg.data.max_samples == 40
    sft_steps = _state(run, f"seed0/kd_tproj-{T}/stage2")["step"]  # 40 questions, batch 8: 5 a stage
    assert _state(run, "seed0/dft_tproj/stage3")["step"] == 2 * sft_steps == 10
    first = _first_metrics(run, "seed0/dft_tproj/stage3")
    assert first["ce"] > 0 and first["mdist_resp"] > 0 and "rdist" in first
    # the demo trains it with --teacher-projector, except where the DFT reads a transfer set
    assert "student_dft_tproj" in recipe_students(spec, teacher_projector=True)
    assert "student_dft_tproj" not in recipe_students(spec, teacher_projector=True, transfer_questions=T)


def test_gaps_of_the_tproj_students_paired_by_seed():
    def role(**acc):
        out = _seeds(**acc)
        accs = list(acc.values())
        return {**out, "accuracy": sum(accs) / len(accs), "spread": max(accs) - min(accs)}

    results = {
        "teacher": {"accuracy": 0.99},
        "student_baseline": role(s2=0.50, s3=0.56),
        "student_matched": role(s2=0.60, s3=0.64),
        "student_kd": role(s2=0.58, s3=0.60),
        "student_matched_tproj": role(s2=0.80, s3=0.78),
        "student_kd_tproj": role(s2=0.74, s3=0.73),
        "student_dft_tproj": role(s2=0.83, s3=0.79),
    }
    g = gaps(results)
    assert g["dft_tproj_minus_matched_tproj"] == pytest.approx(2.0)
    assert g["dft_tproj_minus_matched"] == pytest.approx(19.0) and g["dft_tproj_minus_kd_tproj"] == 7.5
    assert g["gap_closed_dft_tproj"] == pytest.approx((81 - 53) / (99 - 53), abs=1e-3)
    assert g["spread_dft_tproj"] == pytest.approx(4.0)
    paired = g["dft_tproj_minus_matched_tproj_paired"]  # differences +3, +1
    assert paired["n"] == 2 and paired["mean"] == pytest.approx(2.0)
    assert g["kd_tproj_minus_matched_tproj_paired"]["mean"] == pytest.approx(-5.5)  # -6, -5
    del results["student_dft_tproj"]
    assert "dft_tproj_minus_matched" not in gaps(results) and "kd_tproj_minus_matched" in gaps(results)


def test_students_option_trains_and_reports_only_the_students_named(pretrained, tmp_path):
    """--students dft_tproj,matched_tproj: the teacher is reused, those two students train for each seed, and
    the report holds them and the gaps between them (paired by seed), none of the roles it did not train."""
    import shutil

    run = tmp_path / "demo"
    shutil.copytree(pretrained[0], run)
    (run / "report.json").unlink()
    teacher_state = _state(run, "teacher/teacher_sft")
    args = ["--quick", "--seeds", "0,1", "--split", "val", "--questions", "40"]
    assert main(["--run-dir", str(run), *args, "--students", "dft_tproj,matched_tproj"]) == 0
    report = _report(run)
    assert student_roles(report) == ["student_matched_tproj", "student_dft_tproj"]
    assert _state(run, "teacher/teacher_sft") == teacher_state  # reused, not retrained
    for sub in ("matched_tproj", "dft_tproj"):
        assert (run / "seed1" / sub).is_dir()
    g = report["gaps"]
    acc = {r: 100 * report[f"student_{r}"]["accuracy"] for r in ("dft_tproj", "matched_tproj")}
    assert g["dft_tproj_minus_matched_tproj"] == pytest.approx(
        acc["dft_tproj"] - acc["matched_tproj"], abs=0.01
    )
    assert g["dft_tproj_minus_matched_tproj_paired"]["n"] == 2
    assert (
        "kd_minus_matched" not in g
        and "dft_tproj_minus_matched" not in g
        and g["gap_closed_dft_tproj"] is None
    )
    md = (run / "report.md").read_text()
    assert "| student_dft_tproj |" in md and "| student_kd |" not in md and "LLaVA-KD minus" not in md
    assert "`dft_tproj` minus `matched_tproj`, paired by seed: mean difference" in md


def test_students_option_is_checked_before_any_work():
    spec = RECIPES["pretrained"]
    order = recipe_students(spec, only=("dft_tproj", "student_baseline", "matched_tproj"))
    assert order == ["student_baseline", "student_matched_tproj", "student_dft_tproj"]  # the report's order
    with pytest.raises(ConfigError, match="no student role 'kd_tprj'; the roles are baseline, matched, kd,"):
        recipe_students(spec, only=("kd_tprj",))
    with pytest.raises(
        ConfigError, match="--students matched: it continues baseline's stage1; name baseline"
    ):
        recipe_students(spec, only=("matched",))
    with pytest.raises(ConfigError, match="drop --teacher-projector"):
        recipe_students(spec, teacher_projector=True, only=("kd",))
    with pytest.raises(ConfigError, match="--students dft_tproj: its one DFT run"):
        recipe_students(spec, transfer_questions=T, only=("dft_tproj",))
    with pytest.raises(ConfigError, match="teacher's projector does not fit its student"):
        recipe_students(RECIPES["scratch"], only=("matched_tproj",))
    with pytest.raises(ConfigError, match="transfer set, and this run has none"):
        recipe_students(spec, only=("kd", "seqkd_transfer"))


def test_kd_emb_student_distils_the_projected_images_in_dpt_and_dft(pretrained):
    """loss.w_emb=30 in stage 1 and stage 3 (where the teacher runs), not in SFT; the term is logged and
    the gaps are the accuracies' differences."""
    run, _, report = pretrained
    for stage, w in (("stage1", 30.0), ("stage2", 0.0), ("stage3", 30.0)):
        cfg = OmegaConf.load(run / f"seed0/kd_emb-{T}" / stage / "final/config.yaml")
        assert cfg.loss.w_emb == w, stage
        first = _first_metrics(run, f"seed0/kd_emb-{T}/{stage}")
        assert ("vemb" in first) == (w > 0), stage
    assert 0 < _first_metrics(run, f"seed0/kd_emb-{T}/stage1")["vemb"] <= 10
    assert _state(run, f"seed1/kd_emb-{T}/stage3")["step"] == _state(run, f"seed1/kd-{T}/stage3")["step"]
    g, acc = report["gaps"], {r: 100 * report[r]["accuracy"] for r in STUDENTS if r in report}
    assert g["kd_emb_minus_matched"] == pytest.approx(
        acc["student_kd_emb"] - acc["student_matched"], abs=0.01
    )
    assert g["kd_emb_minus_kd"] == pytest.approx(acc["student_kd_emb"] - acc["student_kd"], abs=0.01)
    assert "| student_kd_emb |" in (run / "report.md").read_text()
    assert "`kd_emb`, loss.w_emb" in (run / "report.md").read_text()


def test_dft_on_a_transfer_set_reads_the_teachers_answers_to_unlabelled_questions(pretrained):
    """The transfer set: the 120 training questions after the teacher's first 40, the labels replaced by the
    teacher's answers; kd's DFT reads it (its own teacher cache), seqkd_transfer continues kd's SFT with stage 3
    on it without the distillation terms, as many steps as kd's DFT."""
    run, _, report = pretrained
    instruct = json.loads((run / "data/instruct.json").read_text())[40 : 40 + T]
    transfer = run / f"teacher/transfer/transfer-{T}.json"
    written = json.loads(transfer.read_text())
    rows = [json.loads(line) for line in transfer.with_suffix(".answers.jsonl").read_text().splitlines()]
    answers = {row["question_id"]: row["text"] for row in rows}
    assert [r["id"] for r in written] == [r["id"] for r in instruct]
    for rec, source in zip(written, instruct):
        assert rec["conversations"][0] == source["conversations"][0]
        assert rec["conversations"][1]["value"] == answers[rec["id"]]
    for sub, w in ((f"kd-{T}", 1.0), (f"seqkd_transfer-{T}", 0.0)):
        cfg = OmegaConf.load(run / "seed0" / sub / "stage3/final/config.yaml")
        assert cfg.data.path == str(transfer) and cfg.data.max_samples is None
        assert cfg.init_from.removesuffix("/final") == str(run / f"seed0/kd-{T}/stage2")
        assert cfg.loss.w_resp == cfg.loss.w_vis == cfg.loss.w_rel == w
        assert _state(run, f"seed0/{sub}/stage3")["step"] == T // 8
    assert not (run / f"seed0/seqkd_transfer-{T}/stage2").exists()
    assert report["student_seqkd_transfer"]["stages"] == [
        f"stage1 (of kd-{T})",
        f"stage2 (of kd-{T})",
        "stage3",
    ]
    own = (f"seed0/kd-{T}/stage1", f"seed0/kd-{T}/stage2", f"seed0/seqkd_transfer-{T}/stage3")
    seconds = report["student_seqkd_transfer"]["seeds"]["0"]["train_seconds"]
    assert seconds == pytest.approx(sum(_state(run, s)["elapsed"] for s in own), abs=0.2)
    g, acc = report["gaps"], {r: 100 * report[r]["accuracy"] for r in STUDENTS if r in report}
    for a, b in (("kd", "seqkd_transfer"), ("seqkd_transfer", "matched")):
        assert g[f"{a}_minus_{b}"] == pytest.approx(acc[f"student_{a}"] - acc[f"student_{b}"], abs=0.01)
    for role in student_roles(report):  # answers named by the transfer set where the role depends on it
        name = role if role == "student_baseline" else f"{role}-{T}"
        assert (run / f"eval/val/{name}-seed1.answers.jsonl").is_file(), role
    md = (run / "report.md").read_text()
    assert f"DFT on a transfer set of {T} training questions" in md and "`seqkd_transfer`" in md


def test_pretrained_demo_models_have_the_recipe_shape(pretrained):
    run, _, _ = pretrained
    teacher = (run / "teacher/teacher_sft/final/model.yaml").read_text()
    assert "backend: torchvision" in teacher and "feature_node: features.16" in teacher
    student = (run / f"seed0/kd-{T}/stage3/final/model.yaml").read_text()
    assert "num_hidden_layers: 2" in student  # keep_layers [0, 2] of the 3-layer teacher LLM


def test_pretrained_demo_seeds_differ_and_share_the_teacher(pretrained):
    run, _, _ = pretrained
    losses = [_first_metrics(run, f"seed{s}/kd-{T}/stage3") for s in (0, 1)]
    assert losses[0]["loss"] != losses[1]["loss"] and all(row["mdist_resp"] > 0 for row in losses)
    assert not (run / "seed1/teacher").exists() and (run / "teacher/teacher_sft/final").is_dir()


def test_kd_students_distil_from_one_teacher_cache_shared_by_the_seeds(pretrained):
    """DPT and DFT of ``kd`` and ``kd_emb`` (DFT of ``kd_tproj``) read the teacher's outputs from
    TEACHER/cache/<stage> (the DFT's: over the transfer set), built once, with the projected images
    ``kd_emb`` distils: seed 1 found it."""
    run, _, report = pretrained
    built = {}
    for stage in ("stage1", "stage3"):
        cache = run / "teacher/cache" / (stage if stage == "stage1" else f"stage3-transfer-{T}")
        manifest = json.loads((cache / "manifest.json").read_text())
        assert manifest["stage"] == stage and manifest["stats"]["samples"] == (48 if stage == "stage1" else T)
        assert manifest["teacher"]["path"].endswith("teacher/teacher_sft/final")
        assert manifest["layout"]["projected_images"]["shape"][0] == manifest["stats"]["images"]
        built[stage] = (cache / "manifest.json").stat().st_mtime
        for seed in (0, 1):
            cfg = OmegaConf.load(run / f"seed{seed}/kd-{T}/{stage}/final/config.yaml")
            assert cfg.teacher.cache == str(cache), (seed, stage)
            first = _first_metrics(run, f"seed{seed}/kd-{T}/{stage}")
            # both MDist terms computed (a KL over the cache's top-k + rest buckets: >= 0 up to rounding; the
            # tiny random models' visual-position distributions can agree to 1e-7)
            assert first["mdist_resp"] > 0 and first["mdist_vis"] > -1e-5 and "rdist" in first
        # seed 1 trained after the cache was written: it read it, not rebuilt it
        assert _state(run, f"seed1/kd-{T}/{stage}")["elapsed"] > 0
        assert (run / f"seed1/kd-{T}/{stage}/final").stat().st_mtime > built[stage]
    dft_cache = str(run / f"teacher/cache/stage3-transfer-{T}")
    assert OmegaConf.load(run / f"seed0/kd_tproj-{T}/stage3/final/config.yaml").teacher.cache == dft_cache
    assert not (run / "teacher/cache/stage3").exists()  # no DFT on the SFT questions in this run
    for stage in ("stage1", "stage3"):
        cfg = OmegaConf.load(run / f"seed1/kd_emb-{T}/{stage}/final/config.yaml")
        cache = str(run / "teacher/cache/stage1") if stage == "stage1" else dft_cache
        assert cfg.teacher.cache == cache and cfg.loss.w_emb == 30
        # built by kd's seed 0 (which runs before kd_emb) and not rebuilt for kd_emb
        assert built[stage] < (run / f"seed0/kd-{T}/{stage}/final").stat().st_mtime
    assert report["student_kd"]["seeds"]["0"]["train_seconds"] > 0


def test_teacher_cache_is_reused_for_the_same_teacher_and_data_and_rebuilt_for_other_data(
    pretrained, tmp_path
):
    import shutil

    from mllm_kd.apps.easyvqa.roles import QUICK_PRETRAINED, RECIPES
    from mllm_kd.apps.easyvqa.training import teacher_cache
    from mllm_kd.cli import stage_config

    run = pretrained[0]
    shutil.copytree(run / "teacher", tmp_path / "teacher")  # the same teacher, elsewhere
    cache = tmp_path / "teacher/cache/stage1"
    common = [*QUICK_PRETRAINED, "train.progress=false", f"run_dir={tmp_path}/kd", f"data_dir={run}/data"]
    common.append(f"teacher_dir={tmp_path}/teacher")
    cfg = stage_config(RECIPES["pretrained"].config, "stage1", common)
    assert teacher_cache(cfg, cache) == (cache, 0.0)
    fewer = stage_config(
        RECIPES["pretrained"].config, "stage1", [*common, "stages.stage1.data.max_samples=40"]
    )
    path, seconds = teacher_cache(fewer, cache)
    assert path == cache and seconds > 0
    assert json.loads((cache / "manifest.json").read_text())["stats"]["samples"] == 40


def test_without_a_transfer_set_the_dft_reads_the_sft_questions_and_misfits_are_refused(pretrained, tmp_path):
    """The recipe as it is (no --transfer-questions): kd's DFT on its 40 SFT questions (5 steps) and the
    compute-matched SFT 5 + 5, in directories and answer files of their own; the transfer set's students are left
    as they are. A size that is not a multiple of the students' questions, and --seqkd without a transfer set,
    are refused before any training."""
    import shutil

    run = tmp_path / "demo"
    shutil.copytree(pretrained[0], run, symlinks=True)
    before = (run / f"seed0/kd-{T}/stage3/final/model.safetensors").stat().st_mtime
    args = ["--run-dir", str(run), "--quick", "--seeds", "0", "--split", "val", "--questions", "40"]
    assert main([*args, "--transfer-questions", "60"]) == 2
    assert main([*args, "--seqkd"]) == 2
    assert not (run / "teacher/transfer/transfer-60.json").exists() and not (run / "seed0/kd").exists()
    assert main(args) == 0
    assert _state(run, "seed0/kd/stage3")["step"] == 5 and _state(run, "seed0/matched/stage2")["step"] == 10
    cfg = OmegaConf.load(run / "seed0/kd/stage3/final/config.yaml")
    assert cfg.teacher.cache == str(run / "teacher/cache/stage3") and cfg.data.max_samples == 40
    assert (run / f"seed0/kd-{T}/stage3/final/model.safetensors").stat().st_mtime == before
    report = _report(run)
    assert report["transfer_questions"] is None
    for role in ("student_kd", "student_matched"):
        rows = (run / f"eval/val/{role}-seed0.answers.jsonl").read_text().splitlines()
        assert len(rows) == report["teacher"]["n"] and json.loads(rows[0])["model_id"] == f"{role}/seed0"
    assert "DFT on the students' SFT questions" in (run / "report.md").read_text()


def test_questions_sizes_every_sft_and_dft_stage(pretrained):
    """40 questions at batch 8: 5 steps, the DFT on the 120 transfer questions 15, the compute-matched SFT
    5 + 15; pre-training keeps its 48 samples."""
    run, _, _ = pretrained
    paths = ("teacher/teacher_sft", "seed0/kd-120/stage2", "seed0/kd-120/stage3", "seed0/kd-120/stage1")
    steps = {path: _state(run, path)["step"] for path in (*paths, "seed1/matched-120/stage2")}
    assert steps == {
        "teacher/teacher_sft": 5,
        "seed0/kd-120/stage2": 5,
        "seed0/kd-120/stage3": 15,
        "seed0/kd-120/stage1": 6,
        "seed1/matched-120/stage2": 20,
    }


def test_yes_no_prior_is_the_template_majority():
    from mllm_kd.data_prep.easyvqa_questions import Question, template_prior

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

    said = [P("1", "No."), P("2", "gray circle, no"), P("3", "no"), P("4", "circle")]  # q2 described
    out = yes_no_prior(prior, truth, questions, said)
    # prior right on q2, q3 (2 of 3); the model agrees with it on q1, q2 (2 of 3); on the one question
    # the prior gets wrong (q1) the model is wrong too
    assert out == {"n": 3, "accuracy": 66.67, "agreement": 66.67, "accuracy_where_prior_wrong": 0.0}


def test_described_yes_no_checks_the_description_and_whether_the_answer_follows_it():
    from mllm_kd.apps.easyvqa.report import described_yes_no, summarise

    class P:
        def __init__(self, qid, text):
            self.question_id, self.text = qid, text

    rows = [  # (question, image, truth, said)
        ("is there a red shape?", "a.png", "no", "blue circle, no"),  # follows (no red); colour known: right
        (
            "is there not a circle?",
            "a.png",
            "no",
            "blue circle, yes",
        ),  # a circle, "not": implies no; said yes
        ("what color is the shape?", "a.png", "blue", "blue"),  # gives a.png's colour
        ("what shape is in the image?", "b.png", "triangle", "circle"),  # gives b.png's shape
        ("is there a triangle?", "b.png", "yes", "yes"),  # not described
        (
            "does the image contain a green shape?",
            "b.png",
            "no",
            "Green triangle, yes.",
        ),  # follows; colour unknown
    ]
    questions = [
        {"question_id": str(i), "text": f"{q}\nAnswer.", "image": im} for i, (q, im, _, _) in enumerate(rows)
    ]
    truth = {str(i): {"answer": t, "type": "x"} for i, (_, _, t, _) in enumerate(rows)}
    truth["2"]["type"], truth["3"]["type"] = "color", "shape"
    said = [P(str(i), text) for i, (_, _, _, text) in enumerate(rows)]
    out = described_yes_no(truth, questions, said)
    # 4 yes/no questions, 3 described; a.png's colour is the only one known (right); 2 of 3 follow
    assert out == {
        "n": 4,
        "described": 75.0,
        "known": 1,
        "description_right": 100.0,
        "follows_description": 66.67,
    }
    assert described_yes_no(truth, questions, [P(str(i), "yes") for i in range(6)]) == {}  # one-word answers
    seed = {"accuracy": 0.5, "by_type": {}, "train_seconds": 1, "parameters": 1, "llm_parameters": 1, "n": 6}
    seed |= {"stages": [], "yes_no_prior": {}}
    other = {**out, "follows_description": 33.33}
    mean = summarise({0: {**seed, "described_yes_no": out}, 1: {**seed, "described_yes_no": other}})
    assert mean["described_yes_no"]["follows_description"] == 50.0


def test_ablation_on_policy_dft_starts_from_the_kd_students_sft(scratch):
    """The on-policy DFT variant: the demo's kd student's SFT result, then DFT for the same optimizer steps."""
    run, _, report = scratch
    argv = ["--run-dir", str(run), "--recipe", "scratch", "--quick", "--seeds", "0"]
    assert ablate.main([*argv, "--only", "kd", "dft_on_policy", "--on-policy-fraction", "1"]) == 0
    table = json.loads((run / "ablation/report.json").read_text())
    assert table["kd"]["accuracy"] == report["student_kd"]["accuracy"]
    assert table["dft_on_policy"]["on_policy_fraction"] == 1.0 and set(table["dft_on_policy"]["seeds"]) == {
        "0"
    }
    stage = "ablation/seed0/dft_on_policy/stage3"
    assert _state(run, stage)["step"] == _state(run, "seed0/kd/stage3")["step"]
    config = (run / stage / "final/config.yaml").read_text()
    assert f"init_from: {run}/seed0/kd/stage2" in config
    first = _first_metrics(run, stage)
    assert first["on_policy"] == 1.0 and "ce" not in first and first["mdist_resp"] > 0
    assert not (run / "ablation/seed0/kd").exists()  # the demo's kd student was reused, not retrained
    assert "| dft_on_policy |" in (run / "ablation/report.md").read_text()


@pytest.fixture(scope="module")
def gemma(pretrained, tmp_path_factory):
    """The pretrained quick run again (a copy) with ``--teacher-llm gemma3-270m``: its finished SmolLM2-side
    models are reused; a tiny random Gemma 3 teacher with its own tokenizer and one student it teaches."""
    import shutil

    run = tmp_path_factory.mktemp("gemma") / "demo"
    shutil.copytree(pretrained[0], run)
    before = _state(run, f"seed0/kd-{T}/stage3")
    argv = ["--run-dir", str(run), "--quick", "--seeds", "0", "--split", "val", "--questions", "40"]
    code = main([*argv, "--transfer-questions", str(T), "--teacher-llm", "gemma3-270m"])
    return run, code, _report(run), before


def test_teacher_llm_adds_a_gemma_teacher_and_the_student_it_teaches(gemma):
    run, code, report, kd_before = gemma
    assert code == 0 and report["teacher_llm"] == "gemma3-270m"
    assert _state(run, f"seed0/kd-{T}/stage3") == kd_before  # the SmolLM2-taught student was reused
    teacher, student = report["teacher_gemma3-270m"], report["student_kd_gemma3-270m"]
    val = json.loads((run / "data/val_answers.json").read_text())
    assert teacher["n"] == student["n"] == len(val)
    assert set(student["seeds"]) == {"0"} and student["stages"] == ["stage1", "stage2", "stage3"]
    assert report["gaps"]["student_kd_gemma3-270m_minus_student_kd"] == pytest.approx(
        100 * (student["accuracy"] - report["student_kd"]["accuracy"]), abs=0.01
    )
    answers = run / f"eval/val/student_kd_gemma3-270m-{T}-seed0.answers.jsonl"
    assert len(answers.read_text().splitlines()) == len(val)
    # its DFT reads the transfer set as its own teacher answered it
    own = run / f"teacher-gemma3-270m/transfer/transfer-{T}.json"
    config = OmegaConf.load(run / f"seed0/kd-gemma3-270m-{T}/stage3/final/config.yaml")
    assert config.data.path == str(own) and len(json.loads(own.read_text())) == T
    table = (run / "report.md").read_text()
    assert "| teacher_gemma3-270m |" in table and "| student_kd_gemma3-270m |" in table


def test_gemma_teacher_has_the_recipe_with_its_own_llm_and_tokenizer(gemma):
    run = gemma[0]
    model = (run / "teacher-gemma3-270m/teacher_sft/final/model.yaml").read_text()
    assert "model_type: gemma3_text" in model and "feature_node: features.16" in model
    steps = [_state(run, f"{d}/teacher_sft")["step"] for d in ("teacher", "teacher-gemma3-270m")]
    assert steps[0] == steps[1] == 5
    student, teacher = (
        len(json.loads((d / "tokenizer.json").read_text())["model"]["vocab"])
        for d in (run / "data/tokenizer", run / "models/gemma3-270m")
    )
    assert teacher == QUICK_VOCAB < student


def test_gemma_taught_student_distils_across_tokenizers(gemma):
    run, _, report, _ = gemma
    student = run / f"seed0/kd-gemma3-270m-{T}"
    config = (student / "stage3/final/config.yaml").read_text()
    assert "cross_tokenizer: true" in config
    assert f"checkpoint: {run}/teacher-gemma3-270m/teacher_sft" in config
    assert "num_hidden_layers: 2" in (student / "stage3/final/model.yaml").read_text()
    aligned = report["student_kd_gemma3-270m"]["seeds"]["0"]["aligned"]
    for stage in ("stage1", "stage3"):
        rows = [json.loads(x) for x in (student / stage / "metrics.jsonl").read_text().splitlines()]
        assert all(r["mdist_resp"] > 0 for r in rows)
        assert aligned[stage] == pytest.approx(sum(r["aligned"] for r in rows) / len(rows), abs=1e-4)
        assert 0 < aligned[stage] < 1  # the two tokenizers cut some answers differently


def test_gemma3_chat_template_renders_gemma_turns(tmp_path):
    """The template the Gemma export gets: Gemma 3's turns, an empty system turn adds nothing, and the
    answer spans are found (conversations render as growing prefixes)."""
    from mllm_kd.data.encoding import ConversationEncoder
    from mllm_kd.data_prep.weights import GEMMA3_CHAT_TEMPLATE
    from mllm_kd.model.tokenization import load_tokenizer, train_bpe_tokenizer

    tok = load_tokenizer(train_bpe_tokenizer(["what colour is the shape", "red", "blue"] * 20, tmp_path, 300))
    tok.chat_template = GEMMA3_CHAT_TEMPLATE
    conv = [{"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "red"}]
    segments = ConversationEncoder(tok, "chat", 4, 0, system_prompt="").segments(conv)
    bos = tok.bos_token or ""
    assert segments == [
        (f"{bos}<start_of_turn>user\n<image>\nWhat color is it?<end_of_turn>\n<start_of_turn>model\n", False),
        ("red<end_of_turn>\n", True),
    ]
    with_system = ConversationEncoder(tok, "chat", 4, 0, system_prompt="Be brief.").segments(conv)
    assert with_system[0][0].startswith(f"{bos}<start_of_turn>user\nBe brief.\n\n<image>")


def test_data_aligned_share_counts_positions_predicting_a_shared_boundary(tmp_path):
    """The answer 'red', then ChatML's <|im_end|> and newline. A position is aligned when the token it
    predicts starts at a character where a teacher token starts; the newline after the end of turn is a
    template token and never is."""
    from mllm_kd.apps.easyvqa.teachers import data_aligned_share
    from mllm_kd.model.tokenization import load_tokenizer, train_bpe_tokenizer

    whole = load_tokenizer(train_bpe_tokenizer(["red shape", "what colour"] * 50, tmp_path / "a", 300))
    chars = load_tokenizer(train_bpe_tokenizer(["blue"] * 50, tmp_path / "b", 262))
    assert whole.tokenize("red") == ["red"] and chars.tokenize("red") == ["r", "e", "d"]
    record = {
        "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]
    }
    # 'red', <|im_end|>, newline: 'red' (char 0) and the end (char 3) aligned
    assert data_aligned_share([record], whole, whole) == {"response": 3, "aligned": 2, "share": 0.6667}
    assert data_aligned_share([record], whole, chars)["aligned"] == 2  # the teacher's 'r' starts at 0 too
    # 'r', 'e', 'd', <|im_end|>, newline: 'e' and 'd' start inside the teacher's 'red'
    assert data_aligned_share([record], chars, whole) == {"response": 5, "aligned": 2, "share": 0.4}


def test_ablation_teacher_right_dft_at_the_demos_size(scratch):
    """dft_teacher_right: the demo's kd SFT result, then DFT with MDist_resp narrowed to the teacher's right
    answers; --questions sizes the DFT like the demo's size option and still reuses the demo's kd student."""
    run, _, report = scratch
    argv = ["--run-dir", str(run), "--recipe", "scratch", "--quick", "--seeds", "0", "--questions", "40"]
    assert ablate.main([*argv, "--only", "kd", "dft_teacher_right"]) == 0
    table = json.loads((run / "ablation/report.json").read_text())
    assert table["kd"]["accuracy"] == report["student_kd"]["accuracy"]
    stage = run / "ablation/seed0/dft_teacher_right/stage3/final/config.yaml"
    config = yaml.safe_load(stage.read_text())
    assert config["loss"]["resp_where_teacher_right"] is True and config["data"]["max_samples"] == 40
    assert config["init_from"] == f"{run}/seed0/kd/stage2"
    assert not (run / "ablation/seed0/kd").exists()
    assert "mdist_resp" in _first_metrics(run, "ablation/seed0/dft_teacher_right/stage3")


def test_ablation_no_dpt_continues_the_demos_plain_student(scratch):
    """no_dpt is plain PT -> SFT -> DFT: the demo's baseline student's SFT result, then DFT; nothing retrained."""
    run, _, _ = scratch
    argv = ["--run-dir", str(run), "--recipe", "scratch", "--quick", "--seeds", "0", "--only", "no_dpt"]
    assert ablate.main(argv) == 0
    config = yaml.safe_load((run / "ablation/seed0/no_dpt/stage3/final/config.yaml").read_text())
    assert config["init_from"] == f"{run}/seed0/baseline/stage2" and config["loss"]["w_resp"] > 0
    assert sorted(p.name for p in (run / "ablation/seed0/no_dpt").iterdir()) == ["stage3"]
    assert not (run / "ablation/seed0/baseline").exists()


def test_ablation_dpt_variants_train_only_kds_dpt_and_count_sft_plus_dft_steps(scratch):
    """A seed the demo did not run: dpt_matched and dpt_dft train kd's DPT once (not its SFT and DFT), then
    SFT (CE only) or DFT (every term) for the optimizer steps of SFT + DFT, from that DPT result."""
    run, _, _ = scratch
    argv = ["--run-dir", str(run), "--recipe", "scratch", "--quick", "--seeds", "1"]
    assert ablate.main([*argv, "--only", "dpt_matched", "dpt_dft"]) == 0
    seed = run / "ablation/seed1"
    assert sorted(p.name for p in (seed / "kd").iterdir()) == ["stage1"]
    for name, stage in (("dpt_matched", "stage2"), ("dpt_dft", "stage3")):
        config = yaml.safe_load((seed / name / stage / "final/config.yaml").read_text())
        assert config["init_from"] == f"{seed}/kd/stage1" and config["train"]["epochs"] == 2
    assert "mdist_vis" in _first_metrics(run, "ablation/seed1/dpt_dft/stage3")
    assert "mdist_vis" not in _first_metrics(run, "ablation/seed1/dpt_matched/stage2")
    steps = {
        n: len((seed / n / s / "metrics.jsonl").read_text().splitlines())
        for n, s in (("dpt_matched", "stage2"), ("dpt_dft", "stage3"))
    }
    demo_steps = sum(
        len((run / f"seed0/kd/{s}/metrics.jsonl").read_text().splitlines()) for s in ("stage2", "stage3")
    )
    assert steps["dpt_matched"] == steps["dpt_dft"] == demo_steps
    table = json.loads((run / "ablation/report.json").read_text())
    assert set(table) == {"dpt_matched", "dpt_dft"} and set(table["dpt_dft"]["seeds"]) == {"1"}


def test_ablation_matched_variants_count_the_recipes_epochs_not_two(scratch):
    """With SFT at 2 epochs (an override), compute-matched is 2 + 1 epochs of the students' questions: the
    matched variants train 3, as the demo's matched student would, even though the override also names stage2."""
    run, _, _ = scratch
    argv = ["--run-dir", str(run), "--recipe", "scratch", "--quick", "--seeds", "2"]
    assert ablate.main([*argv, "stages.stage2.train.epochs=2", "--only", "baseline_matched", "dpt_dft"]) == 0
    per_epoch = len((run / "seed0/kd/stage3/metrics.jsonl").read_text().splitlines())
    for name, stage in (("baseline_matched", "stage2"), ("dpt_dft", "stage3")):
        done = run / "ablation/seed2" / name / stage
        assert yaml.safe_load((done / "final/config.yaml").read_text())["train"]["epochs"] == 3
        assert len((done / "metrics.jsonl").read_text().splitlines()) == 3 * per_epoch


def test_ablation_jobs_deal_seeds_and_keep_kd_before_its_dft_variants(tmp_path, monkeypatch):
    """--jobs shares its slots between seeds; kd and the DFT-only variants from its SFT are one unit; the
    size options and the split reach every child."""
    calls, commands = [], []

    def fake_run(cmd, env, stdout, stderr):
        only = cmd[cmd.index("--only") + 1 : cmd.index("--recipe")]
        calls.append((int(cmd[cmd.index("--seeds") + 1]), tuple(only), env["OMP_NUM_THREADS"]))
        commands.append(cmd)
        return type("Done", (), {"returncode": 1 if only == ["no_rel"] and calls[-1][0] == 1 else 0})()

    monkeypatch.setattr(ablate.subprocess, "run", fake_run)
    monkeypatch.setattr(ablate, "_demo_checkpoint", lambda run, name, overrides, seed: None)
    monkeypatch.setattr(ablate.os, "cpu_count", lambda: 4)
    names = ["no_rel", "kd", "dft_on_policy", "dft_seq_kd", "no_dpt"]
    with pytest.raises(ablate.MllmKdError, match=r"seed1-no_rel\.log"):
        ablate._train_in_parallel(tmp_path, names, 2, [], "scratch", (0, 1), True, 0.5, (4000, None), "val")
    assert all(cmd[cmd.index("--questions") + 1] == "4000" and "--captions" not in cmd for cmd in commands)
    # each child answers the parent's split (not the default test split), so the parent only reads its answers
    assert all(cmd[cmd.index("--split") + 1] == "val" for cmd in commands)
    assert sorted(calls) == [
        (0, ("kd", "dft_on_policy", "dft_seq_kd"), "2"),
        (0, ("no_dpt",), "2"),  # its baseline is not asked for: the child trains (or reuses) it
        (0, ("no_rel",), "2"),
        (1, ("kd", "dft_on_policy", "dft_seq_kd"), "2"),
        (1, ("no_dpt",), "2"),
        (1, ("no_rel",), "2"),
    ]


def test_weights_link_replaces_a_link_into_a_deleted_environment(tmp_path, monkeypatch):
    """A run directory made with another (since deleted) .venv keeps a dangling link to its weights file."""
    from mllm_kd.apps.easyvqa import demo
    from mllm_kd.data_prep import weights

    source = tmp_path / "venv" / "mobilenet_v2.pth"
    source.parent.mkdir()
    source.write_bytes(b"weights")
    monkeypatch.setattr(weights, "export_smollm2", lambda out: out)
    monkeypatch.setattr(weights, "require_file", lambda name: source)
    models = tmp_path / "run" / "models"
    models.mkdir(parents=True)
    (models / source.name).symlink_to(tmp_path / "deleted_venv" / source.name)
    demo.prepare_weights(models)
    assert (models / source.name).read_bytes() == b"weights"
    demo.prepare_weights(models)  # a second call keeps the good link
    assert (models / source.name).resolve() == source.resolve()


@pytest.mark.parametrize(
    "flags, sizes",
    [
        ([], {"teacher_sft": 2000, "stage2": 500, "stage3": 500, "stage1": 1000}),
        (
            ["--student-questions", "1000"],
            {"teacher_sft": 2000, "stage2": 1000, "stage3": 1000, "stage1": 1000},
        ),
        (["--questions", "4000"], {"teacher_sft": 4000, "stage2": 4000, "stage3": 4000, "stage1": 1000}),
        (
            ["--questions", "4000", "--student-questions", "1000", "--captions", "2000"],
            {"teacher_sft": 4000, "stage2": 1000, "stage3": 1000, "stage1": 2000},
        ),
    ],
)
def test_size_options_set_the_stages_data(flags, sizes):
    """--student-questions sizes the students' SFT/DFT alone, and wins over --questions there."""
    import argparse

    from mllm_kd.apps.easyvqa.options import add_size_options, size_overrides
    from mllm_kd.apps.easyvqa.roles import RECIPES
    from mllm_kd.cli import stage_config

    p = argparse.ArgumentParser()
    add_size_options(p)
    a = p.parse_args(flags)
    overrides = size_overrides(a.questions, a.captions, a.student_questions)
    got = {s: stage_config(RECIPES["pretrained"].config, s, overrides).data.max_samples for s in sizes}
    assert got == sizes
