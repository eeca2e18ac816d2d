"""Benchmark: the share of padded tokens in a training batch, with and without length-grouped batching.

    python bench/padding.py --data runs/demo/data --tokenizer runs/demo/models/smollm2-135m-instruct
    python bench/padding.py                                   # the LLaVA-665K-like lengths alone

Padded share = padding tokens / all tokens of the padded batches (each batch right-padded to its longest
sample, as :class:`mllm_kd.data.Collator` does), over one epoch in the stages' sample order
(:class:`mllm_kd.data.EpochSampler`, seeded), for ``data.group_by_length=false`` (a random order) and
``true`` (megabatches of ``batch x processes`` samples of one modality, longest first: LLaVA's
``group_by_modality_length``).

Two length sets:

* ``easyvqa``: the main job's stage-3 data (``configs/easyvqa.yaml``: the first 2,000 records of
  ``instruct.json``), every sample encoded exactly as the stage encodes it (SmolLM2's chat template,
  4 visual tokens). Needs ``--data`` and ``--tokenizer``.
* ``llava665k_like``: synthetic, no data needed. LLaVA-665K's mixture as an approximation: 88% image
  samples whose text is log-normal (median 160 tokens, sigma 0.9: short-answer VQA turns up to long
  multi-turn conversations), plus 729 visual tokens (SigLIP-so400m at 384 px); 12% text-only
  (ShareGPT-like, median 500, sigma 1.0); every sample capped at 2,048 tokens. These parameters are
  assumptions, not measurements of the real file.

The LAST line printed is one JSON object with the padded shares.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def padded_share(per_rank: list[list[int]], lengths: list[int], batch: int) -> float:
    """Padding / all tokens when each rank's order is cut into batches of ``batch`` samples, each padded
    to its longest sample."""
    real = padded = 0
    for order in per_rank:
        for i in range(0, len(order), batch):
            chunk = [lengths[j] for j in order[i : i + batch]]
            real += sum(chunk)
            padded += max(chunk) * len(chunk)
    return 1 - real / padded


def epoch_orders(lengths, has_image, batch: int, world: int, grouped: bool, seed: int = 0) -> list[list[int]]:
    """Each rank's sample order in one epoch (what its data loader collates, ``batch`` at a time)."""
    from mllm_kd.data.datasets import EpochSampler

    sampler = EpochSampler(
        len(lengths),
        seed,
        shuffle=True,
        world_size=world,
        lengths=lengths if grouped else None,
        has_image=has_image,
        batch_size=batch,
    )
    orders = []
    for r in range(world):
        sampler.rank = r
        orders.append(sampler.indices())
    return orders


def llava665k_like(n: int, seed: int) -> tuple[list[int], list[bool]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    image = rng.random(n) < 0.88
    text = np.where(image, rng.lognormal(np.log(160), 0.9, n), rng.lognormal(np.log(500), 1.0, n))
    lengths = np.minimum(np.maximum(text, 8).astype(int) + np.where(image, 729, 0), 2048)
    return lengths.tolist(), image.tolist()


def easyvqa_lengths(data: Path, tokenizer: Path) -> tuple[list[int], list[bool]]:
    from mllm_kd.data.encoding import ConversationEncoder
    from mllm_kd.data.records import load_llava_json, record_images
    from mllm_kd.model.tokenization import image_token_id, load_tokenizer
    from mllm_kd.recipe import load_recipe, resolve_stage_config
    from mllm_kd.stages import stage3

    recipe = load_recipe(ROOT / "configs" / "easyvqa.yaml")
    cfg = resolve_stage_config(
        recipe, "stage3", stage3.DEFAULTS, [f"data_dir={data}"], source="configs/easyvqa.yaml"
    )
    tok = load_tokenizer(tokenizer)
    enc = ConversationEncoder(tok, cfg.data.template, 4, image_token_id(tok), cfg.data.system_prompt)
    lengths, has_image = [], []
    for rec in load_llava_json(cfg.data):
        lengths.append(len(enc(rec["conversations"])[0]))
        has_image.append(bool(record_images(rec)))
    return lengths, has_image


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="the demo's data directory (runs/demo/data)")
    p.add_argument(
        "--tokenizer", type=Path, help="SmolLM2's directory (runs/demo/models/smollm2-135m-instruct)"
    )
    p.add_argument("--samples", type=int, default=20000, help="LLaVA-665K-like samples drawn")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sets = {"llava665k_like": (*llava665k_like(args.samples, args.seed), [(4, 8), (16, 1)])}
    if args.data and args.tokenizer:
        sets["easyvqa"] = (*easyvqa_lengths(args.data, args.tokenizer), [(16, 1)])
    out = {}
    print("| lengths | samples | mean / max tokens | batch x processes | padded, random | padded, grouped |")
    print("|---|---|---|---|---|---|")
    for name, (lengths, has_image, shapes) in sets.items():
        for batch, world in shapes:
            shares = {
                g: padded_share(epoch_orders(lengths, has_image, batch, world, g, args.seed), lengths, batch)
                for g in (False, True)
            }
            key = f"{name}_b{batch}x{world}"
            out[key] = {"random": shares[False], "grouped": shares[True]}
            print(
                f"| {name} | {len(lengths):,} | {sum(lengths) / len(lengths):.0f} / {max(lengths)} | "
                f"{batch} x {world} | {shares[False] * 100:.1f}% | {shares[True] * 100:.1f}% |"
            )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
