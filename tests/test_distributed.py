"""Multi-process training (torchrun, gloo, 2 CPU processes) and fault tolerance.

Every run here is a real ``python -m torch.distributed.run`` or ``python -m mllm_kd.stage1`` process.
The data set has captions of equal token length, so the per-process mean losses that DDP averages
equal the global mean and one process with batch 2b is the exact reference for two with batch b.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, TINY_CLIP
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed
# Float32 all-reduce sums in another order than one process does; AdamW's normalisation magnifies the
# difference for gradients that are ~0 in exact arithmetic (e.g. attention key biases): 1e-5 absolute
# on weights after 8 steps at lr 1e-2, 1e-5 relative on losses.
TOL = dict(rtol=1e-5, atol=1e-5)

RECIPE = {
    "run_dir": "unset",
    "model": {
        "vision": {"config": {**TINY_CLIP}},
        "projector": {"type": "mlp2x_gelu"},
        "llm": {
            "config": {
                "model_type": "qwen2",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "max_position_embeddings": 128,
                "tie_word_embeddings": True,
            }
        },
    },
    "data": {"max_length": 64},
    "loss": {"w_resp": 0, "w_vis": 0, "w_rel": 0},
    "trainable": {"vision": "full", "llm": "full"},
    "train": {"progress": False, "deterministic": True, "save_every": 2, "max_steps": 8},
    "optim": {"warmup_ratio": 0.25, "lr": 0.01},
}


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, smoke_data) -> Path:
    """Captions that all tokenize to the same length, over the synthetic images."""
    d = tmp_path_factory.mktemp("dist")
    caps = json.loads((smoke_data / "data/captions.json").read_text())
    for i, rec in enumerate(caps):
        rec["conversations"][1]["value"] = "A red circle." if i % 2 else "A blue square."
    (d / "captions.json").write_text(json.dumps(caps))
    r = json.loads(json.dumps(RECIPE))
    r["model"]["tokenizer"] = str(smoke_data / "data/tokenizer")
    r["data"].update(path=str(d / "captions.json"), image_folder=str(smoke_data / "data/images"))
    path = d / "recipe.yaml"
    path.write_text("# python -m mllm_kd.stage1 --config recipe.yaml\n" + yaml.safe_dump(r))
    return path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(recipe, run_dir, nproc, *overrides):
    base = ["-m", "mllm_kd.stage1", "--config", str(recipe), f"run_dir={run_dir}", *overrides]
    if nproc == 1:
        return [sys.executable, *base]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={_port()}",
        *base,
    ]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(recipe, run_dir, nproc, *overrides):
    proc = subprocess.run(
        _cmd(recipe, run_dir, nproc, *overrides),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def losses(run_dir):
    return [
        json.loads(ln)["loss"] for ln in (Path(run_dir) / "stage1/metrics.jsonl").read_text().splitlines()
    ]


def weights(run_dir):
    return load_file(Path(run_dir) / "stage1/final/model.safetensors")


def assert_same(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory):
    """One process, batch 4: the run every other one must reproduce."""
    out = tmp_path_factory.mktemp("ref")
    run(recipe, out, 1, "train.batch_size=4")
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_equal_one_rank_with_twice_the_batch(recipe, reference, tmp_path, strategy):
    run(recipe, tmp_path, 2, "train.batch_size=2", f"train.strategy={strategy}")
    torch.testing.assert_close(torch.tensor(losses(tmp_path)), torch.tensor(losses(reference)), **TOL)
    assert_same(tmp_path, reference)
    # only rank 0 wrote: one metrics line per step, one final checkpoint
    assert len(losses(tmp_path)) == 8


def test_gradient_accumulation_equals_a_bigger_batch(recipe, reference, tmp_path):
    run(recipe, tmp_path, 2, "train.batch_size=1", "train.grad_accum=2")
    assert_same(tmp_path, reference)


def _start_and_kill(cmd, run_dir, when):
    """Start ``cmd`` in its own process group and SIGKILL the group once ``when(run_dir)`` is true."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.time() + 240
    while not when(run_dir):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _has_checkpoint(step):
    return lambda run_dir: (Path(run_dir) / f"stage1/checkpoints/step-{step:07d}/trainer_state.json").exists()


@pytest.mark.parametrize(
    "first, then",
    [
        ((1, "train.batch_size=4"), (1, "train.batch_size=4")),  # SIGKILL, resume, same final weights
        ((2, "train.batch_size=2"), (1, "train.batch_size=4")),  # DDP run resumed on one process
        ((1, "train.batch_size=4"), (2, "train.batch_size=2")),
    ],  # and the other way round
    ids=["1-to-1", "2-to-1", "1-to-2"],
)
def test_sigkill_then_resume_ends_with_the_same_weights(recipe, reference, tmp_path, first, then):
    kill_at = 2 + 2 * (os.getpid() % 2)  # "a random step": 2 or 4
    _start_and_kill(_cmd(recipe, tmp_path, first[0], first[1]), tmp_path, _has_checkpoint(kill_at))
    assert not (tmp_path / "stage1/final").exists()
    run(recipe, tmp_path, then[0], then[1])
    assert_same(tmp_path, reference)
    torch.testing.assert_close(torch.tensor(losses(tmp_path)), torch.tensor(losses(reference)), **TOL)


def test_fsdp2_sharded_checkpoint_resumes_on_one_process(recipe, reference, tmp_path):
    _start_and_kill(
        _cmd(recipe, tmp_path, 2, "train.batch_size=2", "train.strategy=fsdp2"), tmp_path, _has_checkpoint(4)
    )
    ckpts = sorted((tmp_path / "stage1/checkpoints").glob("step-*"))
    assert ckpts and (ckpts[-1] / "dcp").is_dir()  # written with torch.distributed.checkpoint
    run(recipe, tmp_path, 2, "train.batch_size=2", "train.strategy=fsdp2")
    assert_same(tmp_path, reference)


KILL_DURING_SAVE = """
import os, signal, sys
import mllm_kd.atomic as ck
real = ck._fsync_tree
def dying(tmp):
    if "step-0000004" in str(tmp):
        os.kill(os.getpid(), signal.SIGKILL)  # files written, not yet renamed into place
    real(tmp)
ck._fsync_tree = dying
from mllm_kd.cli import main
sys.exit(main(["stage1"], "t", "t", sys.argv[1:]))
"""


def test_kill_during_checkpoint_write_keeps_the_previous_one(recipe, reference, tmp_path):
    cmd = [
        sys.executable,
        "-c",
        KILL_DURING_SAVE,
        "--config",
        str(recipe),
        f"run_dir={tmp_path}",
        "train.batch_size=4",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    ckpts = sorted(p.name for p in (tmp_path / "stage1/checkpoints").iterdir())
    assert "step-0000002" in ckpts and "step-0000004" not in ckpts
    from mllm_kd.checkpoint.native import load_checkpoint_model

    load_checkpoint_model(tmp_path / "stage1/checkpoints/step-0000002")  # loadable
    run(recipe, tmp_path, 1, "train.batch_size=4")
    assert_same(tmp_path, reference)


def test_full_disk_fails_loudly_and_keeps_the_previous_checkpoint(recipe, tmp_path, monkeypatch):
    import errno

    import mllm_kd.checkpoint.native as ck
    from mllm_kd.cli import stage_config
    from mllm_kd.errors import CheckpointError
    from mllm_kd.stages import STAGES

    real = ck.save_model

    def full_disk(model, path, *a, **k):
        if "step-0000004" in str(path):
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(model, path, *a, **k)

    monkeypatch.setattr(ck, "save_model", full_disk)
    cfg = stage_config(recipe, "stage1", [f"run_dir={tmp_path}", "train.batch_size=4"])
    with pytest.raises(
        CheckpointError, match=r"step-0000004.*No space left on device.*previous checkpoint is intact"
    ):
        STAGES["stage1"].run(cfg)
    names = sorted(p.name for p in (tmp_path / "stage1/checkpoints").iterdir())
    assert names == ["step-0000002"]  # no half-written directory left behind
    ck.load_checkpoint_model(tmp_path / "stage1/checkpoints/step-0000002")


def test_bad_sample_mid_run_is_skipped_and_counted(recipe, smoke_data, tmp_path, caplog):
    import shutil

    from mllm_kd.cli import stage_config
    from mllm_kd.errors import TrainingError
    from mllm_kd.stages import STAGES

    images = tmp_path / "images"
    shutil.copytree(smoke_data / "data/images", images)
    cfg = stage_config(
        recipe,
        "stage1",
        [
            f"run_dir={tmp_path}",
            "train.batch_size=4",
            f"data.image_folder={images}",
            "data.on_error=skip",
            "data.max_skip_fraction=0.2",
            "train.max_steps=4",
        ],
    )
    real_run = STAGES["stage1"].run
    import mllm_kd.data.datasets as data

    real_load = data.load_llava_json

    def load_then_corrupt(c):  # the image goes bad after the preflight passed
        records = real_load(c)
        (images / records[5]["image"]).write_bytes(b"garbage")
        return records

    data.load_llava_json = load_then_corrupt
    try:
        final = real_run(cfg)
    finally:
        data.load_llava_json = real_load
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["skipped_samples"] == 1
    assert "cap-5" in caplog.text
    # more skipped than data.max_skip_fraction allows: the stage stops
    for name in os.listdir(images)[:8]:
        (images / name).write_bytes(b"garbage")
    cfg2 = stage_config(
        recipe,
        "stage1",
        [
            f"run_dir={tmp_path}/b",
            "train.batch_size=4",
            f"data.image_folder={images}",
            "data.on_error=skip",
            "data.verify_images=false",
        ],
    )
    with pytest.raises(TrainingError, match="max_skip_fraction"):
        STAGES["stage1"].run(cfg2)


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp2", marks=pytest.mark.slow)])
def test_on_policy_distillation_on_two_ranks(recipe, smoke_teacher, tmp_path, strategy):
    # Each rank samples its own responses (lengths differ between ranks); the choice of on-policy
    # micro-batches is the same on both, so neither waits for the other in a collective.
    common = [
        "train.batch_size=2",
        "train.max_steps=4",
        f"teacher.checkpoint={smoke_teacher}/teacher_sft",
        "loss.w_resp=1",
        "loss.on_policy_fraction=0.5",
        "generation.max_new_tokens=5",
        "train.seed=1",  # steps 1-3 off-policy, step 4 on-policy
    ]
    run(recipe, tmp_path, 2, *common, f"train.strategy={strategy}")
    rows = [json.loads(ln) for ln in (tmp_path / "stage1/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert {r["on_policy"] for r in rows} == {0.0, 1.0}
    assert all(("ce" in r) == (r["on_policy"] == 0.0) for r in rows)
    assert weights(tmp_path)
