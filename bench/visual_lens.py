"""What the LM head says at the image tokens of the easy-VQA demo's models (a "logit lens").

MDist at visual positions distils the teacher's LM-head distributions at the image tokens. This reads them:
for the first ``--images`` caption records of the demo's data, each model's distribution at every visual
position, averaged per image, and how much of it lies on the image's own colour and shape words against the
other colour and shape words. If the teacher's visual-position outputs say nothing about the image, the
right word gets no more than its share (1/8 of the colour mass, 1/3 of the shape mass).

    python bench/visual_lens.py --data runs/demo_scratch/data teacher=runs/demo_scratch/teacher/teacher_sft \\
        student_kd=runs/demo_scratch/seed0/kd/stage3 student_baseline=runs/demo_scratch/seed0/baseline/stage2

The last line printed is one JSON object, one entry per model.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from mllm_kd.data_prep.easyvqa_questions import COLORS, SHAPES  # noqa: E402

COLOURS = tuple(COLORS)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "models", nargs="+", metavar="NAME=CHECKPOINT", help="models to read (a stage folder or final/)"
    )
    p.add_argument(
        "--data", type=Path, default=Path("runs/demo/data"), help="the demo's prepared data folder"
    )
    p.add_argument("--images", type=int, default=256, help="caption records to read (the first N)")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args(argv)
    for m in args.models:
        if "=" not in m:
            p.error(f"expected NAME=CHECKPOINT, got {m!r}")
    return args


def word_ids(tok) -> dict[str, int]:
    """Each colour and shape word as one token (as it follows a space in a caption)."""
    ids = {}
    for w in COLOURS + SHAPES:
        pieces = tok.convert_tokens_to_ids(tok.tokenize(" " + w))
        if len(pieces) != 1:
            raise SystemExit(f"error: {w!r} is {len(pieces)} tokens in this tokenizer; the probe needs one")
        ids[w] = pieces[0]
    return ids


def read_model(checkpoint: str, records: list[dict], caption_file: Path, args) -> dict:
    import torch

    from mllm_kd.checkpoint.native import load_checkpoint_model
    from mllm_kd.config import DataConfig
    from mllm_kd.data.datasets import Collator, build_train_data
    from mllm_kd.data.encoding import ImageProcessor

    model, tok, cfg = load_checkpoint_model(checkpoint)
    model.eval()
    images = ImageProcessor(model.vision.image_size, cfg.vision.image_mean, cfg.vision.image_std)
    data_cfg = DataConfig(path=str(caption_file), image_folder=str(args.data / "images"), max_length=1024)
    data = build_train_data(data_cfg, tok, model.num_visual_tokens, model.image_token_id, images)
    collate = Collator(tok.pad_token_id)
    ids = word_ids(tok)
    top: collections.Counter = collections.Counter()
    sums = dict.fromkeys(("colour", "right_colour", "shape", "right_shape", "entropy"), 0.0)
    n = len(records)
    for i in range(0, n, args.batch):
        batch = collate([data.dataset[j] for j in range(i, min(n, i + args.batch))])
        with torch.no_grad():
            logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits.float()
        vis = batch["input_ids"] == model.image_token_id
        for k in range(logits.shape[0]):
            p = logits[k][vis[k]].softmax(-1)  # [visual tokens, V]
            mean = p.mean(0)
            caption = records[i + k]["conversations"][1]["value"].lower()
            colour = next(w for w in COLOURS if w in caption)
            shape = next(w for w in SHAPES if w in caption)
            top[tok.decode([int(mean.argmax())]).strip() or repr(tok.decode([int(mean.argmax())]))] += 1
            sums["colour"] += float(sum(mean[ids[w]] for w in COLOURS))
            sums["right_colour"] += float(mean[ids[colour]])
            sums["shape"] += float(sum(mean[ids[w]] for w in SHAPES))
            sums["right_shape"] += float(mean[ids[shape]])
            sums["entropy"] += float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())
    avg = {k: v / n for k, v in sums.items()}
    return {
        "images": n,
        "top_tokens": top.most_common(3),
        "mass_colour_words": avg["colour"],
        "mass_right_colour": avg["right_colour"],
        "right_colour_share": avg["right_colour"] / avg["colour"] if avg["colour"] else float("nan"),
        "mass_shape_words": avg["shape"],
        "mass_right_shape": avg["right_shape"],
        "right_shape_share": avg["right_shape"] / avg["shape"] if avg["shape"] else float("nan"),
        "entropy_nats": avg["entropy"],
        "log_vocab_nats": math.log(len(tok)),
    }


def main(argv=None) -> int:
    import logging

    logging.disable(logging.INFO)
    args = parse_args(argv)
    captions = args.data / "captions.json"
    if not captions.is_file():
        raise SystemExit(
            f"error: {captions} not found (run python -m mllm_kd.data_prep.easyvqa --out {args.data})"
        )
    records = json.loads(captions.read_text())[: args.images]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "captions.json"
        subset.write_text(json.dumps(records))
        for spec in args.models:
            name, checkpoint = spec.split("=", 1)
            out[name] = read_model(checkpoint, records, subset, args)
    print(
        f"# LM-head distributions at the visual positions, {len(records)} caption images of {args.data} "
        f"(chance share of the right word: colour {1 / len(COLOURS):.3f}, shape {1 / len(SHAPES):.3f})\n"
    )
    print(
        "| model | most frequent top token | mass on colour words | right colour's share | mass on shape words "
        "| right shape's share | entropy (nats) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in out.items():
        tops = ", ".join(f"{t!r} x{c}" for t, c in r["top_tokens"])
        print(
            f"| {name} | {tops} | {r['mass_colour_words']:.4f} | {r['right_colour_share']:.3f} | "
            f"{r['mass_shape_words']:.4f} | {r['right_shape_share']:.3f} | {r['entropy_nats']:.2f} "
            f"(of {r['log_vocab_nats']:.2f}) |"
        )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
