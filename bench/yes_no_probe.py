"""Can a randomly initialised LLM of the demo's teacher size learn easy-VQA's yes/no comparison from text?

    python bench/yes_no_probe.py --tokenizer RUN/data/tokenizer [--lr 1e-3] [--steps 600] [--layers 3]

The demo's teacher answers easy-VQA's yes/no questions ("is there a red shape?") at the prior of each
question template, not by looking. This probe removes the image: each sample states the colour in text
("what color is the shape?" -> "blue") and then asks "is there a {colour} shape?", yes and no equally
often, so the only way above 50% is to compare the two colour words. It trains the teacher's LLM
(configs/easyvqa_scratch.yaml: Qwen2, hidden 128, 3 layers, 4 heads) from scratch with AdamW on the answer token
only, batch 64, and prints held-out accuracy (512 fresh samples) every 100 steps; the last line is one
JSON object. Needs the demo's tokenizer (``python -m mllm_kd.data_prep.easyvqa --out DIR``).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

COLORS = ["red", "green", "blue", "black", "gray", "yellow", "teal", "brown"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    tok.padding_side = "left"
    yes, no = (tok.encode(w, add_special_tokens=False)[0] for w in ("yes", "no"))

    def batch(n: int) -> tuple[dict, torch.Tensor]:
        prompts, labels = [], []
        for _ in range(n):
            color, match = rng.choice(COLORS), rng.random() < 0.5
            asked = color if match else rng.choice([c for c in COLORS if c != color])
            messages = [
                {"role": "user", "content": "what color is the shape?"},
                {"role": "assistant", "content": color},
                {"role": "user", "content": f"is there a {asked} shape?"},
            ]
            prompts.append(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
            labels.append(yes if match else no)
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc, torch.tensor(labels)

    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    started, curve = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        enc, labels = batch(args.batch_size)
        loss = torch.nn.functional.cross_entropy(model(**enc).logits[:, -1], labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps:
            with torch.no_grad():
                enc, labels = batch(512)
                pick = model(**enc).logits[:, -1, [yes, no]].argmax(-1)
                acc = (torch.where(pick == 0, yes, no) == labels).float().mean().item()
            curve.append({"step": step, "loss": round(loss.item(), 4), "accuracy": round(acc, 4)})
            print(f"step {step}: loss {loss.item():.4f}, held-out accuracy {acc:.3f}", flush=True)
    print(
        json.dumps(
            {
                "lr": args.lr,
                "steps": args.steps,
                "layers": args.layers,
                "final_accuracy": curve[-1]["accuracy"],
                "best_accuracy": max(c["accuracy"] for c in curve),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
