"""Batched greedy generation (left padding, KV cache) against a plain no-cache greedy loop."""

import json

import torch

from mllm_kd.checkpoint.native import load_checkpoint_model
from mllm_kd.model.generate import Generator, answer_file, read_questions, shared_prefix


def _reference_greedy(model, ids, pixels, steps, stop):
    """One sample, no padding, no cache: recompute the whole sequence each step."""
    out = []
    seq = torch.tensor([ids])
    for _ in range(steps):
        logits = model(seq, torch.ones_like(seq), pixels).logits[0, -1]
        nxt = int(logits.argmax())
        if nxt in stop:
            break
        out.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return out


def test_batched_generation_equals_reference(smoke_teacher):
    model, tok, _ = load_checkpoint_model(smoke_teacher / "teacher_sft")
    model.eval()
    gen = Generator.from_model(model, tok, max_new_tokens=6)
    img = gen.images.load(smoke_teacher / "data/images/00000.png", "test")[None]
    prompts = [
        "<image>\nWhat shape is in the image?",
        "Name a colour.",
        "<image>\nWhat color is the shape? Be brief please.",
        "Is there a circle?\n<image>\nAnswer in one word.",  # the image after the question
    ]
    pixels = [img, None, img, img]
    stop = set(gen.stop_ids())
    with torch.no_grad():
        want = []
        for p, px in zip(prompts, pixels):
            toks = _reference_greedy(model, gen.encoder.prompt_ids(p), px, 6, stop)
            want.append(tok.decode(toks, skip_special_tokens=True).strip())
        got = gen(prompts, pixels)
    assert got == want
    # the batch's shared prefix (the template's header) ran once, as the KV cache of generate
    ids = [gen.encoder.prompt_ids(p) for p in prompts]
    assert shared_prefix(ids, model.image_token_id) >= 2
    gen.prefix_cache = False
    assert gen(prompts, pixels) == want
    gen.prefix_cache = True
    # the batch's padding does not change a prompt's answer
    assert gen(prompts[:1], pixels[:1]) == want[:1]


def test_shared_prefix_stops_at_the_first_image_and_leaves_each_prompt_a_token():
    img = 9
    assert shared_prefix([[1, 2, 3, img, 4], [1, 2, 3, img, 5]], img) == 3  # an image's features differ
    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]], img) == 2  # the shorter prompt keeps its last token
    assert shared_prefix([[1, 2], [2, 2]], img) == 0
    assert shared_prefix([[1, 2, 3]], img) == 0  # nothing to share


def test_answer_file_writes_llava_format_and_resumes(smoke_teacher, tmp_path):
    model, tok, _ = load_checkpoint_model(smoke_teacher / "teacher_sft")
    gen = Generator.from_model(model, tok, max_new_tokens=3)
    qfile = tmp_path / "q.jsonl"
    qs = [
        {"question_id": i, "image": f"{i:05d}.png", "text": "What shape is in the image?"} for i in range(5)
    ]
    qfile.write_text("".join(json.dumps(q) + "\n" for q in qs))
    out = tmp_path / "answers.jsonl"
    answer_file(
        gen, read_questions(qfile)[:3], smoke_teacher / "data/images", out, "m", batch_size=2, progress=False
    )
    with open(out, "a") as f:
        f.write('{"question_id": 3, "te')  # a torn last line, as after a crash
    answer_file(
        gen, read_questions(qfile), smoke_teacher / "data/images", out, "m", batch_size=2, progress=False
    )
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [0, 1, 2, 3, 4]
    for r in rows:
        assert set(r) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert r["prompt"].startswith("<image>\n") and r["model_id"] == "m"
    # chunking: two workers together answer every question once
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    answer_file(gen, qs, smoke_teacher / "data/images", a, "m", chunk=(0, 2), progress=False)
    answer_file(gen, qs, smoke_teacher / "data/images", b, "m", chunk=(1, 2), progress=False)
    ids = sorted(json.loads(ln)["question_id"] for f in (a, b) for ln in f.read_text().splitlines())
    assert ids == [0, 1, 2, 3, 4]


def test_answer_file_keeps_a_question_placed_image(smoke_teacher, tmp_path):
    """A question with its own ``<image>`` (after the text) is prompted as written; others get it first."""
    model, tok, _ = load_checkpoint_model(smoke_teacher / "teacher_sft")
    model.eval()
    gen = Generator.from_model(model, tok, max_new_tokens=4)
    qs = [
        {"question_id": 0, "image": "00000.png", "text": "What shape is it?\n<image>\nOne word."},
        {"question_id": 1, "image": "00000.png", "text": "What shape is it?\nOne word."},
    ]
    out = tmp_path / "answers.jsonl"
    answer_file(gen, qs, smoke_teacher / "data/images", out, "m", progress=False)
    rows = sorted((json.loads(ln) for ln in out.read_text().splitlines()), key=lambda r: r["question_id"])
    assert [r["prompt"] for r in rows] == [qs[0]["text"], "<image>\n" + qs[1]["text"]]
    img = gen.images.load(smoke_teacher / "data/images/00000.png", "test")[None]
    assert [r["text"] for r in rows] == gen([r["prompt"] for r in rows], [img, img])


class _EchoGenerator:
    """Records each batch of prompts and answers every prompt with its own upper-cased text."""

    def __init__(self):
        self.batches = []

    def __call__(self, prompts, pixels):
        self.batches.append(list(prompts))
        return [p.upper() for p in prompts]


def test_answer_file_batches_questions_of_one_kind_and_keeps_each_answer_with_its_question(tmp_path):
    kinds = ["yes/no", "color", "yes/no", "shape", "color", "yes/no", "color"]
    qs = [{"question_id": i, "text": f"q{i} " + "x" * (7 - i), "category": k} for i, k in enumerate(kinds)]
    gen = _EchoGenerator()
    out = answer_file(gen, qs, tmp_path, tmp_path / "a.jsonl", "m", batch_size=2, progress=False)
    kind_of = {q["text"]: q["category"] for q in qs}
    # sorted by (category, prompt length), then cut: only a batch at a boundary mixes two kinds
    assert [[kind_of[p] for p in b] for b in gen.batches] == [
        ["color", "color"],
        ["color", "shape"],
        ["yes/no", "yes/no"],
        ["yes/no"],
    ]
    assert [len(p) for p in gen.batches[0]] == sorted(len(p) for p in gen.batches[0])  # shorter prompts first
    rows = {r["question_id"]: r["text"] for r in map(json.loads, out.read_text().splitlines())}
    assert rows == {q["question_id"]: q["text"].upper() for q in qs}


def test_eval_run_batches_questions_of_similar_prompt_length(tmp_path):
    from mllm_kd.eval.core import Question
    from mllm_kd.eval.run import generate_answers

    qs = [Question(i, None, "x" * n) for i, n in enumerate([9, 1, 8, 2, 7, 3])]
    gen = _EchoGenerator()
    generate_answers(gen, qs, None, tmp_path / "a.jsonl", "m", batch_size=2, workers=1, progress=False)
    assert [[len(p) for p in b] for b in gen.batches] == [[1, 2], [3, 7], [8, 9]]
    rows = {
        r["question_id"]: r["text"] for r in map(json.loads, (tmp_path / "a.jsonl").read_text().splitlines())
    }
    assert rows == {q.question_id: q.prompt.upper() for q in qs}


def test_no_shared_prefix_cache_inside_a_sliding_window():
    """Padding between the cached prefix and the rest would take places in a sliding window: only a window at
    least as long as the sequence (or none) allows the prefix cache, and then the answers are the same."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mllm_kd.model.generate import _kv_cache, within_attention_window

    def tiny(model_type, **extra):
        cfg = AutoConfig.for_model(
            model_type, vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, **extra,
        )  # fmt: skip
        return AutoModelForCausalLM.from_config(cfg).eval()

    sliding = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"], head_dim=16)
    assert not within_attention_window(tiny("gemma3_text", **sliding), 5)
    assert within_attention_window(tiny("gemma3_text", **sliding), 4)
    assert within_attention_window(tiny("qwen2", sliding_window=4, use_sliding_window=False), 50)
    assert within_attention_window(tiny("llama"), 10_000)

    torch.manual_seed(0)
    prefix, rests = torch.randint(3, 100, (6,)), [torch.randint(3, 100, (n,)) for n in (5, 7, 4)]
    T, P = max(len(r) for r in rests), len(prefix)
    shared, padded = torch.zeros(3, P + T, dtype=torch.long), torch.zeros(3, P + T, dtype=torch.long)
    for b, r in enumerate(rests):
        shared[b, :P], shared[b, P + T - len(r) :] = prefix, r
        padded[b, P + T - len(r) - P :] = torch.cat([prefix, r])

    def answers(llm, ids, cached):
        embeds, cache = llm.get_input_embeddings()(ids), {}
        with torch.no_grad():
            if cached:  # as Generator does
                cache = _kv_cache(llm(inputs_embeds=embeds[:1, :P], use_cache=True, logits_to_keep=1))
                next(iter(cache.values())).batch_repeat_interleave(3)
            return llm.generate(
                inputs_embeds=embeds, attention_mask=(ids != 0).long(), max_new_tokens=8, do_sample=False,
                pad_token_id=0, **cache,
            )  # fmt: skip

    llama = tiny("llama")
    assert torch.equal(answers(llama, shared, True), answers(llama, padded, False))
    gemma = tiny("gemma3_text", **sliding)  # the window of 4 is shorter than the 21 tokens
    assert not torch.equal(answers(gemma, shared, True), answers(gemma, padded, False))
