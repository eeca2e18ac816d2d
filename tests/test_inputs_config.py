"""Bad input to the config loader and the stage CLIs: every case exits 2 with one line naming the key or
file, before any model is built and with nothing written (table-driven cases plus hypothesis properties)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mllm_kd.cli import main, stage_config
from mllm_kd.config import StageConfig
from mllm_kd.errors import ConfigError
from mllm_kd.recipe import resolve_stage_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
FAST = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def refused(capsys, tmp_path, *overrides, stage="stage3", config=SMOKE, run_dir=None):
    """Run a stage CLI in-process; assert exit 2, one line on stderr, no traceback, nothing written."""
    run_dir = run_dir or tmp_path / "run"
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main([stage], "test", "test", ["--config", str(config), f"run_dir={run_dir}", *overrides])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err and not captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a refused run wrote something"
    return lines[0]


# ------------------------------------------------------------------------------------------ ranges
OUT_OF_RANGE = [
    ("optim.lr=-1", "optim.lr"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.projector_lr=-0.1", "optim.projector_lr"),
    ("optim.weight_decay=-1", "optim.weight_decay"),
    ("optim.betas=[0.9,1.5]", "optim.betas"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.warmup_ratio=1.5", "optim.warmup_ratio"),
    ("optim.min_lr_ratio=-0.1", "optim.min_lr_ratio"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm"),
    ("loss.w_ce=-1", "loss.w_ce"),
    ("loss.w_resp=-1", "loss.w_resp"),
    ("loss.w_vis=-0.5", "loss.w_vis"),
    ("loss.w_rel=-1", "loss.w_rel"),
    ("loss.w_rel=inf", "loss.w_rel"),
    ("loss.temperature=0", "loss.temperature"),
    ("loss.temperature=-2", "loss.temperature"),
    ("loss.beta=1.5", "loss.beta"),
    ("loss.alpha=-0.1", "loss.alpha"),
    ("loss.chunk_size=0", "loss.chunk_size"),
    ("train.epochs=0", "train.epochs"),
    ("train.epochs=-1", "train.epochs"),
    ("train.max_steps=0", "train.max_steps"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.grad_accum=0", "train.grad_accum"),
    ("train.save_every=-5", "train.save_every"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.log_every=0", "train.log_every"),
    ("train.seed=-1", "train.seed"),
    ("train.device=tpu", "train.device"),
    ("train.precision=fp16", "train.precision"),
    ("train.strategy=zero3", "train.strategy"),
    ("data.max_length=0", "data.max_length"),
    ("data.max_skip_fraction=2", "data.max_skip_fraction"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.max_samples=0", "data.max_samples"),
    ("data.on_error=ignore", "data.on_error"),
    ("model.vision.image_size=0", "model.vision.image_size"),
    ("model.vision.image_std=[0,1,1]", "model.vision.image_std"),
    ("model.vision.image_mean=[0.5]", "model.vision.image_mean"),
    ("model.projector.type=mlp0x_gelu", "model.projector.type"),
    ("model.llm.keep_layers=[]", "model.llm.keep_layers"),
    ("model.llm.keep_layers=[0,0]", "model.llm.keep_layers"),
    ("model.llm.keep_layers=[-1]", "model.llm.keep_layers"),
    ("teacher.cache_topk=0", "teacher.cache_topk"),
    ("teacher.cache_relation_rank=-1", "teacher.cache_relation_rank"),
    ("teacher.quantize=2bit", "teacher.quantize"),
    ("model.llm.attn_implementation=flash", "model.llm.attn_implementation"),
    ("lora.r=0", "lora.r"),
    ("lora.alpha=0", "lora.alpha"),
    ("lora.dropout=1", "lora.dropout"),
    ("log.wandb=maybe", "log.wandb"),
    ("run_dir=", "run_dir"),
]
WRONG_TYPE = [
    ("train.batch_size=abc", "batch_size"),
    ("train.epochs=many", "epochs"),
    ("train.max_steps=1.5", "max_steps"),
    ("loss.fused=maybe", "fused"),
    ("optim.betas=0.9", "betas"),
    ("data.max_length=[1]", "max_length"),
    ("model.llm.keep_layers=abc", "keep_layers"),
    ("optim.lr=${nowhere}", "nowhere"),
]
UNKNOWN = [
    ("loss.w_relation=1", "w_relation"),
    ("train.batchsize=2", "batchsize"),
    ("optim.lrr=1", "lrr"),
    ("model.visionn.path=x", "visionn"),
    ("foo=1", "foo"),
    ("stages.stage9.train.epochs=1", "stage9"),
    ("noequals", "key=value"),
]


@pytest.mark.parametrize("override, key", OUT_OF_RANGE + WRONG_TYPE + UNKNOWN, ids=lambda x: str(x)[:40])
def test_bad_override_exits_2_naming_the_key(capsys, tmp_path, override, key):
    line = refused(capsys, tmp_path, override)
    assert key in line
    assert "smoke.yaml" in line or "=" not in override  # a malformed override is not the file's fault


@pytest.mark.parametrize(
    "override", ["optim.lr=-1", "loss.w_rel=-1", "train.epochs=0", "train.save_every=-5", "loss.chunk_size=0"]
)
def test_a_new_users_mistakes_on_the_smoke_recipe_are_refused_at_config_load(override):
    """These trained and printed `finished:` (chunk_size: refused after the models were built)."""
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        stage_config(SMOKE, "stage1", [override])


# ------------------------------------------------------------------------------------ contradictions
CONTRADICTIONS = [
    (["teacher.checkpoint=null"], "teacher.checkpoint"),  # stage3 distils: it needs a teacher
    (["teacher.cache=c", "loss.temperature=2"], "loss.temperature"),
    (["teacher.quantize=4bit", "train.teacher_strategy=fsdp2"], "teacher_strategy"),
    (["train.strategy=fsdp2", "optim.name=adamw8bit"], "adamw8bit"),
    (["train.strategy=fsdp2", "trainable.llm=lora"], "trainable.llm=lora"),
    (["trainable.projector=frozen", "trainable.llm=frozen"], "nothing would train"),
    (["lora.quantize=4bit"], "lora.quantize"),
    (["data.format=wds", "data.group_by_length=true"], "data.group_by_length"),
    (["model.llm.path=somewhere"], "model.llm"),
    (["model.llm.gguf_file=m.gguf"], "model.llm.gguf_file"),
    (["optim.name=adamw8bit", "optim.fused=true"], "optim.fused"),
    (["model.vision.path=somewhere"], "model.vision"),
    (["teacher.cache=c", "loss.on_policy_fraction=0.5"], "loss.on_policy_fraction"),
    (["teacher.cache=c", "loss.sequence_kd=true"], "loss.sequence_kd"),
    (["loss.cross_tokenizer=true", "loss.on_policy_fraction=0.5"], "generated responses are not re-encoded"),
    (["loss.cross_tokenizer=true", "loss.sequence_kd=true"], "generated responses are not re-encoded"),
    (["loss.cross_tokenizer=true", "loss.w_emb=1"], "another embedding space with loss.cross_tokenizer"),
    (["loss.w_emb=-1"], "loss.w_emb"),
    (
        ["teacher.cache=c", "loss.w_hidden=1"],
        "loss.w_hidden=1.0 distils the teacher's hidden states, which a teacher cache",
    ),
    (["loss.cross_tokenizer=true", "loss.w_hidden=1"], "another embedding space with loss.cross_tokenizer"),
    (["loss.w_hidden=-1"], "loss.w_hidden"),
]


@pytest.mark.parametrize("overrides, key", CONTRADICTIONS, ids=lambda x: str(x)[:50])
def test_contradictory_options_exit_2_naming_them(capsys, tmp_path, overrides, key):
    assert key in refused(capsys, tmp_path, *overrides)


def test_what_is_not_a_contradiction_is_accepted():
    no_kd = ["teacher.checkpoint=null", "loss.w_resp=0", "loss.w_vis=0", "loss.w_rel=0"]
    assert not stage_config(SMOKE, "stage3", no_kd).loss.distills
    # distilling only the projected images still needs the teacher
    assert stage_config(SMOKE, "stage3", [*no_kd[1:], "loss.w_emb=1"]).loss.distills
    assert stage_config(SMOKE, "stage2", ["teacher.checkpoint=null"]).teacher.checkpoint is None  # no KD
    cached = stage_config(SMOKE, "stage3", ["teacher.cache=c", "train.teacher_strategy=fsdp2"])
    assert cached.teacher.cache == "c"  # replicated (no weights to shard), as the run plan logs
    # a cache built from a quantised teacher is checked against teacher.quantize (its fingerprint)
    assert (
        stage_config(SMOKE, "stage3", ["teacher.cache=c", "teacher.quantize=4bit"]).teacher.quantize == "4bit"
    )
    assert stage_config(SMOKE, "teacher_pt", ["teacher.checkpoint=null"]).stage == "teacher_pt"
    # a teacher of another tokenizer, cached (docs/cross-tokenizer.md)
    cross_cached = stage_config(SMOKE, "stage3", ["teacher.cache=c", "loss.cross_tokenizer=true"])
    assert cross_cached.loss.cross_tokenizer and cross_cached.teacher.cache == "c"


# ------------------------------------------------------------------------------------ files and paths
def test_config_file_problems_exit_2(capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    assert str(missing) in refused(capsys, tmp_path, config=missing)
    torn = tmp_path / "torn.yaml"
    torn.write_text("run_dir: runs/x\noptim: {lr: [1,\n")
    line = refused(capsys, tmp_path, config=torn)
    assert str(torn) in line and "line" in line
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert "mapping" in refused(capsys, tmp_path, config=listing)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(SMOKE.read_text() + "\nloss: {w_foo: 1}\n")
    line = refused(capsys, tmp_path, config=unknown)
    assert "w_foo" in line and str(unknown) in line
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(SMOKE.read_text().replace("batch_size: 4", "batch_size: -4"))
    line = refused(capsys, tmp_path, config=wrong)
    assert "train.batch_size" in line and str(wrong) in line


def _fake_checkpoint(path: Path) -> Path:
    """A directory that passes as a finished checkpoint (only its two marker files exist)."""
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"")
    (path / "trainer_state.json").write_text("{}")
    return path


def test_missing_paths_exit_2_before_any_model_is_built(capsys, tmp_path, smoke_data):
    data = [f"data_dir={smoke_data}/data"]
    run = tmp_path / "run"
    assert "model.tokenizer" in refused(capsys, tmp_path, stage="teacher_pt")  # no data_dir/tokenizer
    line = refused(capsys, tmp_path, *data, "data.path=/nope/train.json", stage="teacher_pt")
    assert "/nope/train.json" in line and "data.path" in line
    line = refused(capsys, tmp_path, *data, "data.image_folder=/nope/images", stage="teacher_pt")
    assert "data.image_folder" in line
    assert "model.vision.checkpoint" in refused(capsys, tmp_path, *data, stage="stage1")
    vision = _fake_checkpoint(tmp_path / "tower")
    line = refused(
        capsys,
        tmp_path,
        *data,
        f"model.vision.checkpoint={vision}",
        "teacher.checkpoint=/nope/t",
        stage="stage1",
    )
    assert "teacher.checkpoint /nope/t does not exist" in line
    line = refused(
        capsys, tmp_path, *data, f"model.vision.checkpoint={vision}", "teacher.cache=/nope/c", stage="stage1"
    )
    assert "teacher.cache" in line
    assert "init_from" in refused(capsys, tmp_path, *data, stage="stage2")
    assert not run.exists()


# ------------------------------------------------------------------------------- the other CLIs
def test_cache_teacher_and_export_refuse_bad_input_with_exit_2(capsys, tmp_path):
    from mllm_kd import cache_teacher, export
    from mllm_kd.teacher.cache_format import MANIFEST

    cache = tmp_path / "cache"
    base = ["--config", str(SMOKE), f"run_dir={tmp_path}/run"]
    cases = [
        (cache_teacher.main, [*base, "--batch-size", "0", f"teacher.cache={cache}"], "--batch-size"),
        (cache_teacher.main, [*base, f"teacher.cache={cache}", "loss.w_rel=-1"], "loss.w_rel"),
        (cache_teacher.main, [*base, "teacher.cache=null"], "teacher.cache=DIR"),
        (
            cache_teacher.main,
            ["--stage", "stage1", *base, f"teacher.cache={cache}", "teacher.checkpoint=null"],
            "teacher.checkpoint",
        ),
    ]
    for main_fn, argv, key in cases:
        assert main_fn(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0], err
    cache.mkdir()
    (cache / MANIFEST).write_text("{}")
    assert cache_teacher.main([*base, f"teacher.cache={cache}"]) == 2
    assert "already holds a teacher cache" in capsys.readouterr().err
    out = tmp_path / "exported"
    assert export.main(["--checkpoint", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert f"--checkpoint {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export.main(["--checkpoint", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "exported"]  # no run directory


# ------------------------------------------------------------------------------------------ properties
# (key, the documented range) of every numeric field with one: any value is either accepted and in its
# range, or refused with a ConfigError naming the key; never another exception.
RANGES = {
    "optim.lr": lambda x: x > 0,
    "optim.projector_lr": lambda x: x > 0,
    "optim.weight_decay": lambda x: x >= 0,
    "optim.warmup_ratio": lambda x: 0 <= x <= 1,
    "optim.min_lr_ratio": lambda x: 0 <= x <= 1,
    "optim.max_grad_norm": lambda x: x >= 0,
    "loss.w_ce": lambda x: x >= 0,
    "loss.w_resp": lambda x: x >= 0,
    "loss.w_vis": lambda x: x >= 0,
    "loss.w_rel": lambda x: x >= 0,
    "loss.temperature": lambda x: x > 0,
    "loss.beta": lambda x: 0 <= x <= 1,
    "loss.alpha": lambda x: 0 <= x <= 1,
    "loss.chunk_size": lambda x: x >= 1,
    "train.epochs": lambda x: x > 0,
    "train.max_steps": lambda x: x >= 1,
    "train.batch_size": lambda x: x >= 1,
    "train.grad_accum": lambda x: x >= 1,
    "train.save_every": lambda x: x >= 0,
    "train.keep_checkpoints": lambda x: x >= 1,
    "train.log_every": lambda x: x >= 1,
    "train.seed": lambda x: 0 <= x < 2**32,
    "data.max_length": lambda x: x >= 1,
    "data.max_skip_fraction": lambda x: 0 <= x <= 1,
    "data.num_workers": lambda x: x >= 0,
    "data.max_samples": lambda x: x >= 1,
    "model.vision.image_size": lambda x: x >= 1,
    "teacher.cache_topk": lambda x: x >= 1,
    "teacher.cache_relation_rank": lambda x: x >= 0,
    "lora.r": lambda x: x >= 1,
    "lora.alpha": lambda x: x > 0,
    "lora.dropout": lambda x: 0 <= x < 1,
}
NUMBERS = st.one_of(
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 0.5, 1e-12, 2**32]),
)


def _value(cfg: StageConfig, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


@FAST
@given(key=st.sampled_from(sorted(RANGES)), value=NUMBERS)
def test_property_numbers_are_accepted_only_in_range(key, value):
    try:
        cfg = resolve_stage_config({}, "stage2", {}, [f"{key}={value!r}"])
    except ConfigError as e:
        assert key.rsplit(".", 1)[-1] in str(e)
        return
    got = _value(cfg, key)
    assert math.isfinite(got) and RANGES[key](got), (key, value, got)


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


@FAST
@given(key=st.sampled_from([*RANGES, "train.device", "data.template", "loss.kind", "optim.betas"]), text=TEXT)
def test_property_any_text_value_is_accepted_or_named(key, text):
    try:
        resolve_stage_config({}, "stage2", {}, [f"{key}={text}"])
    except ConfigError as e:
        assert key.rsplit(".", 1)[-1] in str(e) or "key=value" in str(e) or "interpolation" in str(e).lower()


@FAST
@given(
    section=st.sampled_from(["", "loss.", "optim.", "train.", "data.", "model.vision."]),
    name=st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
)
def test_property_unknown_keys_are_named(section, name):
    try:
        resolve_stage_config({}, "stage2", {}, [f"{section}{name}=1"])
    except ConfigError as e:
        assert name in str(e)


# ------------------------------------------------------------------------------------------ subprocess
def test_the_real_entry_point_prints_one_line_and_no_traceback(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "mllm_kd.stage1",
        "--config",
        str(SMOKE),
        f"run_dir={tmp_path}/r",
        "optim.lr=-1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {SMOKE} (stage stage1): optim.lr must be > 0, got -1.0"
    ]
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------- argument errors (argparse)
def _entry(module: str):
    import importlib

    main_fn = importlib.import_module(module).main
    if module == "mllm_kd.cli":
        return lambda argv: main_fn(["stage1"], "python -m mllm_kd.stage1", "stage 1", argv)
    return main_fn


ARGUMENT_ERRORS = [
    ("mllm_kd.cli", [], "--config"),  # the stage commands
    ("mllm_kd.cli", ["--config"], "--config: expected one argument"),
    ("mllm_kd.export", ["--checkpoint", "x"], "--out"),
    ("mllm_kd.cache_teacher", ["--config", "c", "--batch-size", "abc"], "'abc'"),
    ("mllm_kd.eval.cli", ["score", "--task", "nope"], "nope"),
    ("mllm_kd.eval.cli", ["frobnicate"], "frobnicate"),
    ("mllm_kd.data_prep.easyvqa", ["--out", "o", "--shard-size", "x"], "--shard-size"),
    (
        "mllm_kd.data_prep.synthetic",
        ["--bogus"],
        "mllm_kd.data_prep.synthetic: the following arguments are required: --out",
    ),
    ("mllm_kd.data_prep.weights", ["nope"], "nope"),
    ("mllm_kd.apps.easyvqa.demo", ["--seeds"], "--seeds"),
    ("mllm_kd.apps.easyvqa.ablate", ["--bogus"], "--bogus"),
    ("mllm_kd.eval.lmms", ["--bogus"], "required: --questions"),
]


@pytest.mark.parametrize("module, argv, expected", ARGUMENT_ERRORS, ids=lambda x: str(x)[:30])
def test_argument_errors_are_one_line_and_exit_2(capsys, module, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        _entry(module)(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
