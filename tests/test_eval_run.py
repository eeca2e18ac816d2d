"""``python -m mllm_kd.eval run``: answer files in LLaVA format, resume, chunks / torchrun ranks, MMBench."""

import base64
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_CLIP

from mllm_kd.checkpoint.native import build_from_config, save_checkpoint
from mllm_kd.config import LLMConfig, ModelConfig, VisionConfig
from mllm_kd.data_prep.synthetic import make_synthetic
from mllm_kd.eval.cli import main
from mllm_kd.model.tokenization import load_tokenizer

LLAVA_KEYS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
SHORT = "Answer the question using a single word or phrase."


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """A tiny untrained checkpoint, 8 images, an easy-VQA question/answer pair and a 2-row MMBench TSV."""
    root = tmp_path_factory.mktemp("eval_run")
    data = make_synthetic(root / "data", n_images=8)
    tok = load_tokenizer(data / "tokenizer")
    cfg = ModelConfig(
        vision=VisionConfig(config={**TINY_CLIP, "num_hidden_layers": 2}),
        llm=LLMConfig(
            config={
                "model_type": "qwen2",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "max_position_embeddings": 256,
                "tie_word_embeddings": True,
            }
        ),
    )
    save_checkpoint(root / "ckpt", build_from_config(cfg, tok), cfg, tok, None, {"step": 0})
    # easy-VQA: a LLaVA question file and the annotations `score` reads
    qs = [
        {"question_id": str(i), "image": f"{i:05d}.png", "text": f"What shape is in the image?\n{SHORT}"}
        for i in range(7)
    ]
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    answers = {str(i): {"answer": "circle", "type": "shape"} for i in range(7)}
    (root / "answers.json").write_text(json.dumps(answers))
    # MMBench dev TSV: base64 images, 3 + 2 options (LLaVA rounds: 5 questions)
    with open(root / "mmbench.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(
            ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
        )
        for idx, opts, ans in ((0, ["circle", "square", "triangle"], "A"), (1, ["red", "blue"], "B")):
            b64 = base64.b64encode((data / "images" / f"{idx:05d}.png").read_bytes()).decode()
            row = [
                idx,
                "What is shown?",
                "nan",
                *opts,
                *["nan"] * (4 - len(opts)),
                ans,
                "shape",
                "percept",
                b64,
            ]
            w.writerow(row)
    return root


def run_args(
    bench: Path, out: Path, *extra: str, task: str = "easyvqa", model: Path | None = None
) -> list[str]:
    questions = bench / ("mmbench.tsv" if task == "mmbench" else "questions.jsonl")
    return [
        "run",
        "--model",
        str(model or bench / "ckpt"),
        "--task",
        task,
        "--questions",
        str(questions),
        "--images",
        str(bench / "data" / "images"),
        "--out",
        str(out),
        "--batch-size",
        "3",
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tear(path: Path, keep: int) -> None:
    """Keep ``keep`` complete lines plus half of the next one (an interrupted write)."""
    text = path.read_text().splitlines(keepends=True)
    path.write_text("".join(text[:keep]) + text[keep][: len(text[keep]) // 2])


def test_easyvqa_answers_resume_and_score(bench, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    assert main(run_args(bench, out, "--model-id", "tiny")) == 0
    rows = lines(out)
    assert [r["question_id"] for r in rows] == [str(i) for i in range(7)]
    for r in rows:
        assert set(r) == LLAVA_KEYS
        assert r["prompt"] == f"What shape is in the image?\n{SHORT}"  # LLaVA: no <image> token
        assert isinstance(r["text"], str) and r["model_id"] == "tiny" and r["metadata"] == {}
    assert len({r["answer_id"] for r in rows}) == 7

    tear(out, 2)
    assert main(run_args(bench, out, "--model-id", "tiny")) == 0
    resumed = lines(out)
    assert resumed[:2] == rows[:2]  # kept as they were
    assert sorted(r["question_id"] for r in resumed) == [str(i) for i in range(7)]  # no duplicates
    assert "dropped a torn last line" in capsys.readouterr().err

    assert main(run_args(bench, out)) == 0  # complete: nothing to do, file unchanged
    assert lines(out) == resumed

    score = tmp_path / "run" / "eval" / "easyvqa.json"
    args = [
        "score",
        "--task",
        "easyvqa",
        "--predictions",
        str(out),
        "--annotations",
        str(bench / "answers.json"),
    ]
    assert main([*args, "--out", str(score)]) == 0
    result = json.loads(score.read_text())
    assert result["n"] == 7 and result["missing"] == 0 and result["model_id"] == "tiny"


def test_chunks_and_torchrun_ranks_cover_every_question_once(bench, tmp_path, monkeypatch):
    out = tmp_path / "answers.jsonl"
    parts = [tmp_path / f"answers.chunk{i}-of-2.jsonl" for i in range(2)]
    assert main(run_args(bench, out, "--chunk-index", "0", "--chunk-count", "2")) == 0
    assert parts[0].exists() and not out.exists()  # not merged before chunk 1 is done
    # chunk 1 as torchrun's rank 1 of 2 (the same file naming)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(run_args(bench, out)) == 0
    ids = [[r["question_id"] for r in lines(p)] for p in parts]
    assert ids == [["0", "1", "2"], ["3", "4", "5", "6"]]
    assert [r["question_id"] for r in lines(out)] == [str(i) for i in range(7)]  # merged in order
    assert lines(out) == lines(parts[0]) + lines(parts[1])
    # flags and torchrun together are an input error
    assert main(run_args(bench, out, "--chunk-index", "0", "--chunk-count", "2")) == 2


def test_mmbench_subprocess_base64_rounds_resume_and_score(bench, tmp_path):
    out = tmp_path / "mmbench.jsonl"
    cmd = [sys.executable, "-m", "mllm_kd.eval", *run_args(bench, out, task="mmbench")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    written = lines(out)  # in the order the batches ran
    rows = sorted(written, key=lambda r: (r["question_id"], r["round_id"]))
    assert [(r["question_id"], r["round_id"]) for r in rows] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert rows[1]["options"] == ["square", "triangle", "circle"] and rows[1]["option_char"] == [
        "B",
        "C",
        "A",
    ]
    assert set(rows[0]) == LLAVA_KEYS | {"round_id", "options", "option_char"}
    assert rows[0]["prompt"].endswith(
        "C. triangle\nAnswer with the option's letter from the given choices directly."
    )

    tear(out, 2)  # rounds share a question_id: resume matches on (question_id, round_id, prompt)
    assert main(run_args(bench, out, task="mmbench")) == 0
    resumed = lines(out)
    assert resumed[:2] == written[:2]
    assert sorted((r["question_id"], r["round_id"]) for r in resumed) == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
    ]

    args = [
        "score",
        "--task",
        "mmbench",
        "--predictions",
        str(out),
        "--annotations",
        str(bench / "mmbench.tsv"),
    ]
    assert main(args) == 0


def test_input_errors_exit_2_naming_the_problem(bench, tmp_path, capsys):
    missing = tmp_path / "no-such-ckpt"
    assert main(run_args(bench, tmp_path / "a.jsonl", model=missing)) == 2
    assert str(missing) in capsys.readouterr().err

    assert main(run_args(bench, tmp_path / "a.jsonl", "--chunk-index", "2", "--chunk-count", "2")) == 2
    assert "chunk index 2" in capsys.readouterr().err

    foreign = tmp_path / "foreign.jsonl"  # an answers file of other questions is not silently extended
    foreign.write_text(json.dumps({"question_id": "99", "prompt": "?", "text": "x"}) + "\n")
    assert main(run_args(bench, foreign)) == 2
    assert "not among this run's questions" in capsys.readouterr().err
