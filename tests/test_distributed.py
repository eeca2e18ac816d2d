"""Multi-process training (torchrun, gloo, 2 CPU processes) and fault tolerance.

Every run here is a real ``python -m torch.distributed.run`` or ``python -m mllm_kd.stage1`` process.
The data set has captions of equal token length, so the per-process mean losses that DDP averages
equal the global mean and one process with batch 2b is the exact reference for two with batch b.
"""

import contextlib
import json
import logging
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


def succeeds(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root; it must exit 0 (its stderr's tail is the failure message)."""
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def run(recipe, run_dir, nproc, *overrides):
    return succeeds(_cmd(recipe, run_dir, nproc, *overrides))


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


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [
        pytest.param("ddp", (), id="ddp"),
        pytest.param("fsdp2", (), id="fsdp2"),
        # activation checkpointing recomputes each layer inside DDP's and FSDP2's backward hooks
        pytest.param("ddp", ("train.gradient_checkpointing=true",), marks=pytest.mark.slow, id="ddp-ckpt"),
        pytest.param(
            "fsdp2", ("train.gradient_checkpointing=true",), marks=pytest.mark.slow, id="fsdp2-ckpt"
        ),
        # the reference runs the lean RMSNorm / MLP (the default); transformers' own forwards sharded equal it
        pytest.param(
            "fsdp2", ("train.lean_activations=false",), marks=pytest.mark.slow, id="fsdp2-eager-ops"
        ),
    ],
)
def test_two_ranks_equal_one_rank_with_twice_the_batch(recipe, reference, tmp_path, strategy, extra):
    run(recipe, tmp_path, 2, "train.batch_size=2", f"train.strategy={strategy}", *extra)
    torch.testing.assert_close(torch.tensor(losses(tmp_path)), torch.tensor(losses(reference)), **TOL)
    assert_same(tmp_path, reference)
    # only rank 0 wrote: one metrics line per step, one final checkpoint
    assert len(losses(tmp_path)) == 8


def test_gradient_accumulation_equals_a_bigger_batch(recipe, reference, tmp_path):
    run(recipe, tmp_path, 2, "train.batch_size=1", "train.grad_accum=2")
    assert_same(tmp_path, reference)


LEAVE = """
import atexit, sys
import torch.distributed as dist
from mllm_kd.runtime.distributed import init_distributed
# registered first, so it runs after init_distributed's own exit handler (atexit runs last-in, first-out)
atexit.register(lambda: print("group alive at exit:", dist.is_initialized()))
info = init_distributed("cpu")
dist.barrier()
print("rank", info.rank, "of", info.world_size)
"""


def test_every_rank_destroys_its_process_group_at_exit(tmp_path):
    """A rank that exits with its gloo group alive can abort in the interpreter's teardown."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVE)
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_port()}", "--tee=1"]
    proc = succeeds([sys.executable, *launcher, str(script)], timeout=120)
    assert proc.stdout.count("of 2") == 2, proc.stdout
    assert proc.stdout.count("group alive at exit: False") == 2, proc.stdout


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc). torchrun starts its workers in their own sessions, so
    killing torchrun's process group alone would leave them training."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _start_and_kill(cmd, run_dir, when, delay=0.0):
    """Start ``cmd`` and SIGKILL it and every process below it ``delay`` s after ``when(run_dir)``: a lost
    node."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.time() + 240
    while not when(run_dir):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(delay)
    for pid in [proc.pid, *_descendants(proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def _has_checkpoint(step):
    return lambda run_dir: (Path(run_dir) / f"stage1/checkpoints/step-{step:07d}/trainer_state.json").exists()


@pytest.mark.parametrize(
    "first, then",
    [
        # SIGKILL, resume, same final weights; the default run keeps the case that changes the world size
        # from one process to two, the other two (about 22 s on 2 CPU cores) run with `make test-all`
        pytest.param((1, "train.batch_size=4"), (1, "train.batch_size=4"), marks=pytest.mark.slow),
        pytest.param((2, "train.batch_size=2"), (1, "train.batch_size=4"), marks=pytest.mark.slow),
        ((1, "train.batch_size=4"), (2, "train.batch_size=2")),
    ],
    ids=["1-to-1", "2-to-1", "1-to-2"],
)
def test_sigkill_then_resume_ends_with_the_same_weights(recipe, reference, tmp_path, first, then):
    kill_at = 2 + 2 * (os.getpid() % 2)  # "a random step": 2 or 4
    _start_and_kill(_cmd(recipe, tmp_path, first[0], first[1]), tmp_path, _has_checkpoint(kill_at))
    assert not (tmp_path / "stage1/final").exists()
    run(recipe, tmp_path, then[0], then[1])
    assert_same(tmp_path, reference)
    torch.testing.assert_close(torch.tensor(losses(tmp_path)), torch.tensor(losses(reference)), **TOL)


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


def test_full_disk_fails_loudly_and_keeps_the_previous_checkpoints(recipe, tmp_path, monkeypatch):
    import errno

    import mllm_kd.checkpoint.native as ck
    from mllm_kd.cli import stage_config
    from mllm_kd.errors import CheckpointError
    from mllm_kd.stages import STAGES

    real = ck.save_model

    def full_disk(model, path, *a, **k):
        if "step-0000006" in str(path):
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(model, path, *a, **k)

    monkeypatch.setattr(ck, "save_model", full_disk)
    cfg = stage_config(recipe, "stage1", [f"run_dir={tmp_path}", "train.batch_size=4"])
    with pytest.raises(
        CheckpointError, match=r"step-0000006.*No space left on device.*previous checkpoint is intact"
    ):
        STAGES["stage1"].run(cfg)
    names = sorted(p.name for p in (tmp_path / "stage1/checkpoints").iterdir())
    # no half-written directory left behind, and pruning (keep_checkpoints=2) waited for step 6: both
    # older checkpoints are still there
    assert names == ["step-0000002", "step-0000004"]
    for name in names:
        ck.load_checkpoint_model(tmp_path / "stage1/checkpoints" / name)


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
    import mllm_kd.train.stage as data  # the stage's preflight reads the records (before any model)

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


# --------------------------------------------------------------------------------------- preemption
# The stage waits after step 3 until the test has sent its signal (the file `go` appears), so the signal
# always lands in step 3 whatever the machine's speed. Once `go` exists, every checkpoint write of the
# signalled process (its rank is in `go`) sends it a second SIGTERM half-way (before the manifest is
# written), which must change nothing.
PREEMPT = """
import os, signal, sys, time
from pathlib import Path
import mllm_kd.checkpoint.native as native
from mllm_kd.stages import STAGES, Stage
go, args, rank = Path(sys.argv[1]), sys.argv[2:], os.environ.get("RANK", "0")
Path(f"{go}.pid{rank}").write_text(str(os.getpid()))
def wait_for_go(step, sums):
    while step == 3 and not go.exists():
        time.sleep(0.01)
real_manifest = native.write_manifest
def second_signal(d):
    if go.exists() and go.read_text() == rank:
        os.kill(os.getpid(), signal.SIGTERM)
    return real_manifest(d)
native.write_manifest = second_signal
s = STAGES["stage1"]
STAGES["stage1"] = Stage(s.name, s.defaults, lambda cfg: s.run(cfg, on_step=wait_for_go), s.summary)
from mllm_kd.cli import main
sys.exit(main(["stage1"], "t", "t", args))
"""


def _logged_step(run_dir) -> int:
    path = Path(run_dir) / "stage1/metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    steps = [json.loads(ln)["step"] for ln in lines if ln.endswith("}")]
    return max(steps, default=0)


def _preempt(recipe, run_dir, nproc, sig, rank, *overrides) -> tuple[int, str]:
    """Run the stage, send ``sig`` to the process of ``rank`` (None: the launcher, torchrun) once step 3
    is logged; returns (exit status, stderr)."""
    script, go, err = run_dir / "preempt.py", run_dir / "go", run_dir / "stderr.log"
    script.write_text(PREEMPT)
    base = [str(script), str(go), "--config", str(recipe), f"run_dir={run_dir}", *overrides]
    launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={_port()}"]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), *base]
    with open(err, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=f)
        deadline = time.time() + 240
        while _logged_step(run_dir) < 3:
            assert proc.poll() is None, err.read_text()[-3000:]
            assert time.time() < deadline
            time.sleep(0.02)
        os.kill(proc.pid if rank is None else int(Path(f"{go}.pid{rank}").read_text()), sig)
        go.write_text(str(rank))
        proc.wait(timeout=240)
    return proc.returncode, err.read_text()


def _assert_preempted_at_step_3(run_dir):
    from mllm_kd.checkpoint.integrity import verify_checkpoint
    from mllm_kd.runtime.preemption import MARKER

    stage = Path(run_dir) / "stage1"
    assert json.loads((stage / MARKER).read_text())["step"] == 3
    assert not (stage / "final").exists()
    names = sorted(p.name for p in (stage / "checkpoints").iterdir())
    assert names == ["step-0000002", "step-0000003"]  # the regular one, and the one written on the signal
    for name in names:
        verify_checkpoint(stage / "checkpoints" / name)  # the second signal did not corrupt it
    assert _logged_step(run_dir) == 3


def test_sigterm_saves_exits_75_and_resumes_to_the_same_weights(recipe, reference, tmp_path):
    from mllm_kd.runtime.preemption import MARKER, PREEMPTED_EXIT

    status, err = _preempt(recipe, tmp_path, 1, signal.SIGTERM, 0, "train.batch_size=4")
    assert status == PREEMPTED_EXIT == 75, err[-3000:]
    assert "preempted: stage1: stopped on SIGTERM after step 3" in err
    _assert_preempted_at_step_3(tmp_path)
    run(recipe, tmp_path, 1, "train.batch_size=4")  # the same command again
    assert not (tmp_path / "stage1" / MARKER).exists()
    assert_same(tmp_path, reference)
    torch.testing.assert_close(torch.tensor(losses(tmp_path)), torch.tensor(losses(reference)), **TOL)


def test_sigusr1_to_one_rank_stops_both_after_the_same_step(recipe, reference, tmp_path):
    import re

    status, err = _preempt(recipe, tmp_path, 2, signal.SIGUSR1, 1, "train.batch_size=2")
    assert status == 1, err[-3000:]  # torchrun reports any failed worker as 1: hence the PREEMPTED file
    # Both ranks stop after the same step and say so; the first to exit makes torchrun SIGTERM the other,
    # which may still be tearing down its interpreter after printing (a race outside the trainer).
    codes = re.findall(r"exitcode\s+:\s+(-?\d+) \(pid", err)
    assert "75" in codes and set(codes) <= {"75", "-15"} and len(codes) == 2, err[-3000:]
    assert "preempted: stage1: stopped on SIGUSR1 after step 3" in err  # rank 1
    assert (
        "preempted: stage1: stopped on a signal to another rank after step 3" in err
    )  # rank 0, the same step
    _assert_preempted_at_step_3(tmp_path)
    run(recipe, tmp_path, 2, "train.batch_size=2")
    assert_same(tmp_path, reference)


@pytest.mark.slow
def test_sigterm_to_torchrun_reaches_every_rank(recipe, reference, tmp_path):
    """Kubernetes: SIGTERM goes to the container's first process, torchrun, which forwards it."""
    status, err = _preempt(recipe, tmp_path, 2, signal.SIGTERM, None, "train.batch_size=2")
    assert status == 1 and err.count("stopped on SIGTERM after step 3") == 2, err[-3000:]
    _assert_preempted_at_step_3(tmp_path)
    run(recipe, tmp_path, 2, "train.batch_size=2")
    assert_same(tmp_path, reference)


def test_damaged_final_or_init_from_stops_the_stage_naming_the_file(recipe, tmp_path):
    from mllm_kd.cli import stage_config
    from mllm_kd.errors import CheckpointError
    from mllm_kd.stages import STAGES

    over = [f"run_dir={tmp_path}", "train.batch_size=4", "train.max_steps=1", "train.save_every=0"]
    final = STAGES["stage1"].run(stage_config(recipe, "stage1", over))
    weights = final / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{weights} does not match its SHA-256.*overwrite=true"):
        STAGES["stage1"].run(stage_config(recipe, "stage1", over))
    with pytest.raises(CheckpointError, match=rf"init_from.*{weights} does not match its SHA-256"):
        STAGES["stage2"].run(stage_config(recipe, "stage2", over))
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))  # repaired; now a file goes missing
    (final / "trainer_state.json").unlink()
    with pytest.raises(CheckpointError, match=r"final/trainer_state.json is missing"):
        STAGES["stage1"].run(stage_config(recipe, "stage1", over))


def test_damaged_step_checkpoints_are_named_and_skipped(recipe, reference, tmp_path, caplog):
    from mllm_kd.cli import stage_config
    from mllm_kd.stages import STAGES

    caplog.set_level(logging.INFO, logger="mllm_kd.train.trainer")
    over = [f"run_dir={tmp_path}", "train.batch_size=4", "train.keep_checkpoints=3"]

    def crash(step, sums):
        if step == 7:
            raise RuntimeError("node lost")

    with pytest.raises(RuntimeError, match="node lost"):
        STAGES["stage1"].run(stage_config(recipe, "stage1", over), on_step=crash)
    ckpts = tmp_path / "stage1/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002", "step-0000004", "step-0000006"]
    (ckpts / "step-0000006/optimizer.pt").unlink()  # written by the trainer: optimizer + RNG state
    state = ckpts / "step-0000004/trainer_state.json"
    state.write_text(state.read_text().replace('"step": 4', '"step": 5'))  # same size, altered
    STAGES["stage1"].run(stage_config(recipe, "stage1", over))
    assert f"{ckpts}/step-0000006/optimizer.pt is missing" in caplog.text
    assert f"{state} does not match its SHA-256" in caplog.text
    assert "step-0000002 (step 2)" in caplog.text  # resumed from the newest intact one
    assert_same(tmp_path, reference)
    torch.testing.assert_close(torch.tensor(losses(tmp_path)), torch.tensor(losses(reference)), **TOL)


def test_not_enough_disk_space_refuses_before_training(recipe, tmp_path, monkeypatch):
    import shutil

    import mllm_kd.checkpoint.space as space
    from mllm_kd.cli import stage_config
    from mllm_kd.errors import CheckpointError
    from mllm_kd.stages import STAGES

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(space.shutil, "disk_usage", lambda p: usage._replace(free=10**6))
    cfg = stage_config(recipe, "stage1", [f"run_dir={tmp_path}", "train.batch_size=4"])
    with pytest.raises(
        CheckpointError, match=rf"not enough disk space in {tmp_path}/stage1: .* \(1000000 bytes\) is free"
    ):
        STAGES["stage1"].run(cfg)
    assert not (tmp_path / "stage1/checkpoints").exists() and not (tmp_path / "stage1/metrics.jsonl").exists()
    off = [f"run_dir={tmp_path}", "train.batch_size=4", "train.max_steps=1", "train.check_disk_space=false"]
    assert STAGES["stage1"].run(stage_config(recipe, "stage1", off)).is_dir()  # the check can be turned off


def test_fsdp2_damaged_newest_shard_resumes_from_the_previous_checkpoint(recipe, reference, tmp_path):
    fsdp = ("train.batch_size=2", "train.strategy=fsdp2")
    status, err = _preempt(recipe, tmp_path, 2, signal.SIGTERM, 0, *fsdp)
    assert status == 1 and "stopped on SIGTERM after step 3" in err, err[-3000:]
    _assert_preempted_at_step_3(tmp_path)
    newest = tmp_path / "stage1/checkpoints/step-0000003"
    shard = newest / "dcp/__1_0.distcp"  # written with torch.distributed.checkpoint, by rank 1
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = run(recipe, tmp_path, 2, *fsdp)
    assert f"{shard} does not match its SHA-256" in proc.stderr  # named, then step 2 is used
    assert "resumed stage1 from" in proc.stderr and "step-0000002 (step 2)" in proc.stderr
    assert (newest.parent / "step-0000003.corrupt").is_dir()
    assert_same(tmp_path, reference)


@pytest.mark.slow
def test_soak_sigkill_at_random_steps_then_resume(recipe, tmp_path):
    """Two DDP ranks killed with SIGKILL at seeded random moments, resumed each time (docs/scale-out.md)."""
    import random

    from mllm_kd.checkpoint.integrity import step_checkpoints, verify_checkpoint

    over = ("train.batch_size=2", "train.max_steps=24", "train.save_every=1")
    run(recipe, tmp_path / "whole", 2, *over)  # the uninterrupted run
    rng = random.Random(20261130)
    soak = tmp_path / "soak"
    for kill_after in sorted(rng.sample(range(2, 23), 5)):
        # killed just after step `kill_after` is logged, a random few ms into its checkpoint write
        delay = rng.uniform(0, 0.05)
        _start_and_kill(
            _cmd(recipe, soak, 2, *over), soak, lambda d, k=kill_after: _logged_step(d) >= k, delay
        )
        assert not (soak / "stage1/final").exists()
        ckpts = step_checkpoints(soak / "stage1")
        newest = int(ckpts[-1].name.split("-")[1])
        assert kill_after - 1 <= newest <= kill_after + 3  # killed where it was meant to be, not at the end
        for ckpt in ckpts:  # whatever moment the kill hit, every checkpoint directory is whole
            verify_checkpoint(ckpt)
        partial = list((soak / "stage1/checkpoints").glob(".step-*"))  # a write the kill cut short
        print(
            f"killed after step {kill_after} (+{delay * 1000:.0f} ms): newest checkpoint {newest}, {partial}"
        )
    run(recipe, soak, 2, *over)
    assert_same(soak, tmp_path / "whole")
    torch.testing.assert_close(torch.tensor(losses(soak)), torch.tensor(losses(tmp_path / "whole")), **TOL)
    assert list((soak / "stage1/checkpoints").iterdir()) == []  # pruned, no temporary or .corrupt left


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
