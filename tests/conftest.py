"""Shared fixtures: a tiny generated data set and a tiny trained teacher (built once per session)."""

import json
from pathlib import Path

import pytest

from mllm_kd.cli import stage_config
from mllm_kd.data_prep.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
# The tiny CLIP vision tower of the unit tests: 16 patches of 8 px over a 32 px image.
TINY_CLIP = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


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


def write_answers(path: Path, rows: list, model_id: str = "m") -> Path:
    """A LLaVA answers file (JSONL): each row a ``(question_id, text)`` pair or a dict of answer fields
    (``question_id``, ``text`` and any others, e.g. ``metadata``), with the fields LLaVA writes around them."""
    with open(path, "w") as f:
        for i, row in enumerate(rows):
            fields = {"question_id": row[0], "text": row[1]} if isinstance(row, tuple) else row
            line = {"prompt": "", "answer_id": f"a{i}", "model_id": model_id, "metadata": {}, **fields}
            f.write(json.dumps(line) + "\n")
    return path
