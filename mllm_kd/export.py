"""Export an mllm_kd checkpoint to the Hugging Face LLaVA layout.

    python -m mllm_kd.export --checkpoint runs/x/stage3 --out exported/student

The result loads with transformers alone::

    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained("./exported/student")
    processor = AutoProcessor.from_pretrained("./exported/student")

See :mod:`mllm_kd.checkpoint.hf_llava` for the mapping and for what the layout cannot express (``linear`` and
``mlp3x_gelu``+ projectors, open_clip towers), which export refuses with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mllm_kd.cli import setup_logging
from mllm_kd.errors import ConfigError, MllmKdError, exit_code
from mllm_kd.model_card import add_card_arguments, card_options


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, overwrite: bool = False, card: dict | None = None
) -> Path:
    """Load an mllm_kd checkpoint (a stage directory or a checkpoint directory) and write it to ``out``,
    with a model card (``README.md``; ``card``: :func:`mllm_kd.model_card.write_model_card` keywords)."""
    from mllm_kd.checkpoint.hf_llava import export_hf_llava
    from mllm_kd.checkpoint.native import load_checkpoint_model

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    model, tokenizer, model_cfg = load_checkpoint_model(checkpoint, what="--checkpoint")
    export_hf_llava(model.eval(), tokenizer, model_cfg, out)
    from mllm_kd.model_card import write_model_card  # the model card (issue 17)

    write_model_card(checkpoint, out, **(card or {}))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mllm_kd.export",
        description="Write an mllm_kd checkpoint as a Hugging Face LLaVA model + processor directory.",
    )
    p.add_argument("--checkpoint", required=True, help="a stage directory (e.g. runs/x/stage3) or checkpoint")
    p.add_argument("--out", required=True, help="the output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    add_card_arguments(p)
    args = p.parse_args(argv)
    setup_logging()
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.overwrite, card=card_options(args))
    except MllmKdError as e:
        return exit_code(e)
    print(f"exported: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
