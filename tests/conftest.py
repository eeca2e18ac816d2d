"""Shared fixtures: a tiny generated data set and a tiny trained teacher (built once per session)."""

from pathlib import Path

import pytest

from mllm_kd.cli import stage_config
from mllm_kd.data_prep.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> Path:
    """A run directory holding only ``data/`` (16 images), laid out as configs/smoke.yaml expects."""
    run_dir = tmp_path_factory.mktemp("smoke_data")
    make_synthetic(run_dir / "data", n_images=16)
    return run_dir


@pytest.fixture(scope="session")
def smoke_teacher(smoke_data) -> Path:
    """The run directory above plus a trained tiny teacher (teacher_pt, teacher_sft)."""
    from mllm_kd.stages import STAGES

    for name in ("teacher_pt", "teacher_sft"):
        STAGES[name].run(stage_config(SMOKE, name, [f"run_dir={smoke_data}"]))
    return smoke_data
