"""Checkpoint integrity (manifest), disk-space refusal, pruning order and the preemption handler.

The end-to-end runs (real signals to real stage processes, resume after a damaged checkpoint, the
SIGKILL soak test) are in tests/test_distributed.py, next to the reference run they compare with.
"""

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from mllm_kd.checkpoint.integrity import (
    MANIFEST,
    latest_step_checkpoint,
    prune_step_checkpoints,
    step_checkpoints,
    verify_checkpoint,
    write_manifest,
)
from mllm_kd.checkpoint.space import OVERHEAD, CheckpointSize, check_disk_space, estimate_checkpoint_size
from mllm_kd.errors import CheckpointError
from mllm_kd.runtime.distributed import DistInfo
from mllm_kd.runtime.preemption import MARKER, StopRequest, ignore_stop_signals

# One checkpoint file of each kind, written by the writer the trainer uses for it.
KINDS = {
    "weights": "model.safetensors",
    "optimizer": "optimizer.pt",
    "dcp": "dcp/__0_0.distcp",
    "trainer_state": "trainer_state.json",
}


def _write_checkpoint(d: Path, step: int = 1) -> Path:
    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(step)
    w = {"a.weight": torch.randn(64, 32, generator=g), "b.bias": torch.randn(32, generator=g)}
    save_file(w, str(d / "model.safetensors"))
    torch.save(
        {"optimizer": {"state": {0: {"exp_avg": torch.randn(64, 32, generator=g)}}}}, d / "optimizer.pt"
    )
    dcp.save({"model": {k: v.clone() for k, v in w.items()}}, checkpoint_id=str(d / "dcp"))
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "epoch": 0}))
    write_manifest(d)
    return d


def _damage(path: Path, how: str) -> None:
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "delete":
        path.unlink()
    else:  # flip one byte in the middle, same size
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    import hashlib

    d = _write_checkpoint(tmp_path / "c")
    files = json.loads((d / MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert set(files) == on_disk and set(KINDS.values()) <= on_disk
    for rel, entry in files.items():
        assert entry["size"] == (d / rel).stat().st_size
        assert entry["sha256"] == hashlib.sha256((d / rel).read_bytes()).hexdigest()
    verify_checkpoint(d)  # intact: no error


@pytest.mark.parametrize("how, says", [("truncate", "bytes"), ("delete", "missing"), ("flip", "SHA-256")])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_damaged_file_is_named(tmp_path, kind, how, says):
    d = _write_checkpoint(tmp_path / "c")
    _damage(d / KINDS[kind], how)
    with pytest.raises(CheckpointError, match=rf"{KINDS[kind]}.*{says}"):
        verify_checkpoint(d)


@pytest.mark.parametrize("kind", list(KINDS))
def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, caplog, kind):
    stage = tmp_path / "stage"
    for step in (2, 4, 6):
        _write_checkpoint(stage / f"checkpoints/step-{step:07d}", step)
    (stage / "checkpoints/.step-0000008.tmp-123").mkdir()  # a write killed half-way
    _damage(stage / "checkpoints/step-0000006" / KINDS[kind], "flip")
    assert latest_step_checkpoint(stage).name == "step-0000004"
    assert KINDS[kind] in caplog.text and "step-0000006.corrupt" in caplog.text
    assert (stage / "checkpoints/step-0000006.corrupt").is_dir()  # kept for inspection, out of the way
    assert not (stage / "checkpoints/.step-0000008.tmp-123").exists()
    assert [p.name for p in step_checkpoints(stage)] == ["step-0000002", "step-0000004"]
    prune_step_checkpoints(stage, 1)
    assert [p.name for p in step_checkpoints(stage)] == ["step-0000004"]


def test_checkpoint_without_manifest_is_loaded_unverified(tmp_path, caplog):
    d = _write_checkpoint(tmp_path / "c")
    (d / MANIFEST).unlink()
    verify_checkpoint(d)
    assert "no manifest.json" in caplog.text


def test_disk_space_refusal_names_needed_free_and_directory(tmp_path, monkeypatch):
    import shutil

    import mllm_kd.checkpoint.space as space

    size = CheckpointSize(step=1000, final=300)
    usage = shutil.disk_usage(tmp_path)

    def free(n):
        monkeypatch.setattr(space.shutil, "disk_usage", lambda p: usage._replace(free=n))

    free(3 * 1000 + 300)  # keep 2: two kept + the one being written + final
    check_disk_space(tmp_path, size, keep=2, periodic=True)
    free(3 * 1000 + 299)
    with pytest.raises(
        CheckpointError, match=rf"{tmp_path}.*needs 0.000 GB \(3300 bytes\).*\(3299 bytes\) is free"
    ):
        check_disk_space(tmp_path, size, keep=2, periodic=True)
    check_disk_space(tmp_path, size, keep=2, periodic=False)  # save_every=0: one (preemption) checkpoint
    (tmp_path / "checkpoints/step-0000002").mkdir(parents=True)  # space already held by the stage
    (tmp_path / "checkpoints/step-0000002/x").write_bytes(b"0" * 10)
    check_disk_space(tmp_path, size, keep=2, periodic=True)


def test_checkpoint_size_estimate_matches_what_is_written(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    torch.save({"optimizer": opt.state_dict()}, tmp_path / "optimizer.pt")
    written = sum(p.stat().st_size for p in tmp_path.iterdir())
    size = estimate_checkpoint_size(model, opt, "adamw", sharded=False)
    assert 0.98 * written <= size.step - OVERHEAD <= 1.05 * written  # weights + AdamW moments + headers
    weights = (tmp_path / "model.safetensors").stat().st_size
    assert size.final - OVERHEAD == pytest.approx(weights, rel=0.05)
    assert estimate_checkpoint_size(model, opt, "adamw", sharded=True).step > size.step


def test_stop_request_records_the_first_signal_and_restores_handlers(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest()
    with stop.installed():
        assert not stop.agreed(DistInfo())
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        assert stop.agreed(DistInfo()) and stop.signum == signal.SIGUSR1
        e = stop.stopped("stage1", tmp_path, 3, tmp_path / "step-3", is_main=True)
    assert "SIGUSR1 after step 3" in str(e)
    assert json.loads((tmp_path / MARKER).read_text())["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is not before  # still ignoring repeats until the exit
    signal.signal(signal.SIGTERM, before)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    quiet = StopRequest()
    with quiet.installed():
        pass
    assert signal.getsignal(signal.SIGTERM) is before  # no signal: the previous handler is back
    off_main = []
    t = threading.Thread(target=lambda: off_main.append(StopRequest().installed().__enter__()))
    t.start()
    t.join()
    assert off_main  # a stage run from a thread trains without handlers instead of failing


def test_data_workers_survive_the_signals_slurm_sends_to_every_process():
    from torch.utils.data import DataLoader

    loader = DataLoader(list(range(64)), batch_size=4, num_workers=1, worker_init_fn=ignore_stop_signals)
    batches = iter(loader)
    first = next(batches)
    for s in (signal.SIGUSR1, signal.SIGTERM):
        os.kill(batches._workers[0].pid, s)
    rest = list(batches)  # a killed worker would raise "DataLoader worker ... killed by signal"
    assert torch.cat([first, *rest]).tolist() == list(range(64))
