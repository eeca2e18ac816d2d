"""A tiny generated data set for smoke tests: coloured shapes, captions and question answering.

``python -m mllm_kd.data_prep.synthetic --out DIR [--images N]`` writes, in the pipeline's formats::

    DIR/images/<id>.png      32x32 images of one coloured shape
    DIR/captions.json        LLaVA caption pairs (stage 1)
    DIR/instruct.json        LLaVA multi-turn conversations (stages 2-3), plus a few text-only ones
    DIR/tokenizer/           a byte-level BPE trained on that text (ChatML template)

Deterministic for a given seed; re-running with the same arguments rewrites identical files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from mllm_kd.errors import ArgumentParser
from mllm_kd.model.tokenization import train_bpe_tokenizer

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, color: tuple[int, int, int], size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return img


def make_synthetic(
    out: str | Path, n_images: int = 48, size: int = 32, seed: int = 0, vocab_size: int = 400
) -> Path:
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions, instruct = [], []
    for i in range(n_images):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        name = f"{i:05d}.png"
        draw(shape, COLORS[color], size, rng).save(out / "images" / name)
        captions.append(
            {
                "id": f"cap-{i}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image briefly."},
                    {"from": "gpt", "value": f"A {color} {shape}."},
                ],
            }
        )
        other = rng.choice([s for s in SHAPES if s != shape])
        instruct.append(
            {
                "id": f"qa-{i}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat shape is in the image?"},
                    {"from": "gpt", "value": shape},
                    {"from": "human", "value": "What color is the shape?"},
                    {"from": "gpt", "value": color},
                    {"from": "human", "value": f"Is there a {other} in the image?"},
                    {"from": "gpt", "value": "no"},
                ],
            }
        )
    for i in range(max(1, n_images // 8)):  # text-only samples exist in LLaVA-mix-665K too
        instruct.append(
            {
                "id": f"text-{i}",
                "conversations": [
                    {"from": "human", "value": "Name a colour."},
                    {"from": "gpt", "value": rng.choice(list(COLORS))},
                ],
            }
        )
    (out / "captions.json").write_text(json.dumps(captions, indent=1))
    (out / "instruct.json").write_text(json.dumps(instruct, indent=1))
    texts = [t["value"] for rec in captions + instruct for t in rec["conversations"]] + [
        "user assistant system"
    ]
    train_bpe_tokenizer(texts, out / "tokenizer", vocab_size=vocab_size)
    return out


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="python -m mllm_kd.data_prep.synthetic", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = make_synthetic(args.out, args.images, seed=args.seed)
    print(f"wrote {args.images} images, captions.json, instruct.json and tokenizer/ to {out}")


if __name__ == "__main__":
    main()
