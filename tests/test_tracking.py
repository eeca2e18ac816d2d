"""Experiment tracking: a smoke stage's scalars read back from the TensorBoard event file and from the W&B
offline run's records; evaluation scores into the same run; rank 0 only; missing packages named."""

from __future__ import annotations

import importlib.util
import json
import struct
import time
from pathlib import Path

import pytest
from conftest import SMOKE

from mllm_kd.cli import main as cli_main
from mllm_kd.cli import stage_config
from mllm_kd.errors import ConfigError
from mllm_kd.eval.cli import main as eval_main
from mllm_kd.tracking import LogConfig, Tracker, open_stage_tracker

TERMS = ("loss", "ce", "mdist_resp", "mdist_vis", "rdist")
SYSTEM = ("grad_norm", "lr_projector", "tokens_per_s", "peak_rss_gb", "samples")


def wandb_records(run_dir: Path) -> list:
    """The protobuf records of a W&B offline run (``run-<id>.wandb``: a ``:W&B`` header, then the LevelDB
    log format: 32 KiB blocks of records with a 7-byte header, crc32 / length / type full-first-middle-last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left  # zero padding up to the end of the block
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        else:
            chunks.append(buf + chunk)
    records = []
    for c in chunks:
        r = pb.Record()
        r.ParseFromString(c)
        records.append(r)
    return records


def wandb_history(run_dir: Path, rows: int = 1) -> list[dict]:
    """The run's history rows; waits (up to 20 s) for ``rows`` of them: wandb-core may still be writing
    the file after ``finish()`` returned."""
    for _ in range(100):
        out = []
        for r in wandb_records(run_dir):
            if r.WhichOneof("record_type") == "history":
                out.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                )
        if len(out) >= rows:
            break
        time.sleep(0.2)
    return out


def tb_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def tracked_stage(smoke_teacher, tmp_path_factory):
    """Smoke stage 1 (3 steps) logging to TensorBoard and W&B offline; then its score logged with eval."""
    from mllm_kd.stages import STAGES

    run = tmp_path_factory.mktemp("tracked")
    overrides = [
        f"run_dir={run}",
        f"data_dir={smoke_teacher}/data",
        f"teacher.checkpoint={smoke_teacher}/teacher_sft",
        f"model.vision.checkpoint={smoke_teacher}/teacher_sft",
        "train.max_steps=3",
        "train.batch_size=2",
        "log.tensorboard=true",
        "log.wandb=offline",
        "log.project=kd-tests",
    ]
    STAGES["stage1"].run(stage_config(SMOKE, "stage1", overrides))
    return run / "stage1"


def _metrics(stage_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_event_file_holds_every_logged_scalar(tracked_stage):
    rows = _metrics(tracked_stage)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_gb"] > 0 for r in rows)
    scalars = tb_scalars(tracked_stage / "tensorboard")
    for key in (*TERMS, *SYSTEM):
        assert [s for s, _ in scalars[f"train/{key}"]] == [1, 2, 3], key
        assert [v for _, v in scalars[f"train/{key}"]] == pytest.approx([r[key] for r in rows], rel=1e-6), key


def test_tensorboard_has_the_resolved_config_once(tracked_stage):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked_stage / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors("config/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert "stage: stage1" in text and "w_rel: 1.0" in text and "wandb: offline" in text


def test_wandb_offline_run_has_the_config_and_the_keys(tracked_stage):
    (run_dir,) = (tracked_stage / "wandb").glob("offline-run-*")
    run_id = (tracked_stage / "wandb-run-id.txt").read_text().strip()
    assert run_dir.name.endswith(run_id)
    records = wandb_records(run_dir)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "kd-tests" and run.display_name == f"{tracked_stage.parent.name}-stage1"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["stage"] == "stage1" and config["loss"]["w_rel"] == 1.0
    history = wandb_history(run_dir, rows=3)
    rows = _metrics(tracked_stage)
    assert [h["_step"] for h in history] == [1, 2, 3]
    for h, r in zip(history, rows):
        for key in (*TERMS, *SYSTEM):
            assert h[f"train/{key}"] == pytest.approx(r[key], rel=1e-6), key


def test_eval_scores_go_to_the_stage_trackers(tracked_stage, tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    annotations = tmp_path / "annotations.json"
    annotations.write_text(
        json.dumps({"1": {"answer": "circle", "type": "shape"}, "2": {"answer": "red", "type": "color"}})
    )
    lines = [{"question_id": 1, "text": "circle"}, {"question_id": 2, "text": "blue"}]
    answers.write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = ["score", "--task", "easyvqa", "--predictions", str(answers), "--annotations", str(annotations)]
    assert eval_main([*args, "--log-to", str(tracked_stage)]) == 0
    scalars = tb_scalars(tracked_stage / "tensorboard")
    assert scalars["eval/easyvqa/accuracy"] == [(3, 50.0)]  # at the stage's last step
    assert scalars["eval/easyvqa/by_type/shape"] == [(3, 100.0)]
    runs = sorted((tracked_stage / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # the same run id, resumed: `wandb sync` merges them
    assert wandb_history(runs[-1])[-1]["eval/easyvqa/accuracy"] == 50.0


def test_only_rank_0_logs(smoke_teacher, tmp_path):
    cfg = stage_config(SMOKE, "stage1", [f"run_dir={tmp_path}", "log.tensorboard=true"])
    tracker = open_stage_tracker(cfg, is_main=False)
    tracker.log({"train/loss": 1.0}, 1)
    tracker.close()
    assert tracker.tb is None and not (tmp_path / "stage1").exists()


def test_missing_package_is_a_clear_error_before_training(smoke_teacher, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    overrides = [f"run_dir={tmp_path}", f"data_dir={smoke_teacher}/data", "log.wandb=online"]
    assert cli_main(["stage1"], "stage1", "", ["--config", str(SMOKE), *overrides]) == 2
    err = capsys.readouterr().err
    assert "log.wandb=online needs the wandb package" in err and ".[track]" in err
    assert not (tmp_path / "stage1").exists()


def test_bad_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"log\.wandb must be offline, online or null"):
        stage_config(SMOKE, "stage1", [f"run_dir={tmp_path}", "log.wandb=yes"])
    with pytest.raises(ConfigError, match="log"):
        stage_config(SMOKE, "stage1", [f"run_dir={tmp_path}", "log.tensorbord=true"])
    assert not Tracker(LogConfig()).tb  # nothing configured: logs nowhere
