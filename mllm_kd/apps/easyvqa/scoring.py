"""Answer the easy-VQA questions with one checkpoint and score the answers (the demo's and the ablations')."""

from __future__ import annotations

import json
from pathlib import Path

from mllm_kd.apps.easyvqa.report import described_yes_no, yes_no_prior


def evaluate(data: Path, split: str, answers: Path, model_id: str, ckpt: Path, redo: bool) -> dict:
    """Answer ``data/<split>_questions.jsonl`` into ``answers`` (greedy) and score it.

    Exact match overall and per type, plus the yes/no template prior (:func:`yes_no_prior`): its own
    accuracy on these questions and how often the model's yes/no answers agree with it; for described
    yes/no answers also :func:`described_yes_no`.
    """

    from mllm_kd.checkpoint.generator import checkpoint_generator
    from mllm_kd.data_prep.easyvqa_questions import train_template_prior
    from mllm_kd.eval.core import read_predictions
    from mllm_kd.eval.tasks.easyvqa import EasyVQATask
    from mllm_kd.model.generate import answer_file, read_questions
    from mllm_kd.model.multimodal import count_parameters
    from mllm_kd.runtime.device import pick_device

    if redo and answers.exists():
        answers.unlink()
    # described yes/no answers: 4-6 tokens, checked ones ("..., red circle present, no") up to 8
    gen = checkpoint_generator(ckpt, pick_device(), max_new_tokens=12)
    model = gen.model
    questions = read_questions(data / f"{split}_questions.jsonl")
    answer_file(gen, questions, data / "images", answers, model_id=model_id, batch_size=128)
    task = EasyVQATask()
    predictions = read_predictions(answers)
    scores = task.score(predictions, task.load(data / f"{split}_answers.json"))
    truth = json.loads((data / f"{split}_answers.json").read_text())
    described = described_yes_no(truth, questions, predictions)
    return {
        "parameters": count_parameters(model),
        "llm_parameters": count_parameters(model.llm),
        **scores,
        "yes_no_prior": yes_no_prior(train_template_prior(), truth, questions, predictions),
        **({"described_yes_no": described} if described else {}),
    }
