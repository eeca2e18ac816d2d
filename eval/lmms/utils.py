"""The easy-VQA task's functions for lmms-eval (copied next to the task YAML by ``python -m mllm_kd.eval.lmms``).

The prompt is the question file's ``text`` (the question + "Answer the question using a single word or
phrase."); llava_hf puts ``<image>\\n`` before it, as ``python -m mllm_kd.eval run`` does. An answer is right
when it equals the annotation after :func:`mllm_kd.eval.normalize.simple_normalize`, the rule of
``python -m mllm_kd.eval score --task easyvqa`` (so mllm_kd must be importable where lmms-eval runs:
``pip install --no-deps -e .``). exact_match is a percentage, as the mllm_kd score.
"""

from PIL import Image

from mllm_kd.eval.normalize import simple_normalize


def easyvqa_doc_to_visual(doc):
    return [Image.open(doc["image_path"]).convert("RGB")]


def easyvqa_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["text"]


def easyvqa_process_results(doc, results):
    right = simple_normalize(results[0]) == simple_normalize(str(doc["answer"]))
    return {"exact_match": 100.0 if right else 0.0}
