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

import sys
from pathlib import Path

from mllm_kd.cli import setup_process
from mllm_kd.errors import ArgumentParser, ConfigError, MllmKdError, exit_code
from mllm_kd.model_card import add_card_arguments, card_options


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    overwrite: bool = False,
    card: dict | None = None,
    progress: bool = True,
) -> Path:
    """Load an mllm_kd checkpoint (a stage directory or a checkpoint directory) and write it to ``out``,
    with a model card (``README.md``; ``card``: :func:`mllm_kd.model_card.write_model_card` keywords).

    ``progress`` shows a bar on stderr counting the weight bytes read, then written, with the time left
    (the estimate for the write comes from the read's speed)."""
    from tqdm.auto import tqdm

    from mllm_kd.checkpoint.hf_llava import export_hf_llava
    from mllm_kd.checkpoint.native import load_checkpoint_model
    from mllm_kd.model_card import write_model_card

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    size = _weight_bytes(checkpoint)
    with tqdm(total=2 * size, desc="export", unit="B", unit_scale=True, disable=not progress) as bar:
        bar.set_postfix_str("reading")
        model, tokenizer, model_cfg = load_checkpoint_model(checkpoint, what="--checkpoint")
        bar.update(size)
        bar.set_postfix_str(f"writing {out}")
        export_hf_llava(model.eval(), tokenizer, model_cfg, out)
        bar.update(size)
    write_model_card(checkpoint, out, **(card or {}))
    return out


def _weight_bytes(checkpoint: str | Path) -> int:
    """Bytes of the weight files :func:`export_checkpoint` reads (native or Hugging Face LLaVA layout)."""
    from mllm_kd.checkpoint.hf_llava import is_hf_llava_dir
    from mllm_kd.checkpoint.native import WEIGHTS, resolve_checkpoint

    if is_hf_llava_dir(checkpoint):
        return sum(f.stat().st_size for f in Path(checkpoint).glob("*.safetensors"))
    return (resolve_checkpoint(checkpoint, "--checkpoint") / WEIGHTS).stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m mllm_kd.export",
        description="Write an mllm_kd checkpoint as a Hugging Face LLaVA model + processor directory.",
    )
    p.add_argument("--checkpoint", required=True, help="a stage directory (e.g. runs/x/stage3) or checkpoint")
    p.add_argument("--out", required=True, help="the output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    add_card_arguments(p)
    args = p.parse_args(argv)
    setup_process()
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.overwrite, card=card_options(args))
    except MllmKdError as e:
        return exit_code(e)
    print(f"exported: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
