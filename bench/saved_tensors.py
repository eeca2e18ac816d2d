"""What one decoder layer keeps for its backward pass, with transformers' forwards and with the lean ones.

    python bench/saved_tensors.py                        # SmolLM2-135M's layer shapes, 16 x 44 tokens, float32
    python bench/saved_tensors.py --autocast bf16        # the same under CPU bf16 autocast

Runs one random decoder layer (``--arch`` llama or qwen2) forward with gradients under
``torch.autograd.graph.saved_tensors_hooks`` and adds up the distinct storages saved for the backward, the
layer's parameters (and their autocast copies) and its input left out; then again after :func:`mllm_kd.model.lean.lean_decoder_ops`.
Prints each saved tensor (size, the operator that made it, shape) and the totals; the LAST line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def saved_storages(layer, x, pos_emb, autocast_dtype) -> dict[int, tuple[int, str, tuple]]:
    import torch

    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved: dict[int, tuple[int, str, tuple]] = {}

    def weight_copy(t) -> bool:  # autocast's (or the lean MLP's) low-precision copy of a parameter
        fn, cast = t.grad_fn, False
        while fn is not None and fn.name() in ("TBackward0", "ToCopyBackward0"):
            cast |= fn.name() == "ToCopyBackward0"
            fn = fn.next_functions[0][0]
        src = getattr(fn, "variable", None)
        return cast and src is not None and src.untyped_storage().data_ptr() in params

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr != x.untyped_storage().data_ptr() and not weight_copy(t):
            made = t.grad_fn.name() if t.grad_fn is not None else "inside a Function"
            saved[ptr] = (t.untyped_storage().nbytes(), made, tuple(t.shape))
        return t

    amp = torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        layer(x, attention_mask=None, position_embeddings=pos_emb)
    return saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llama", choices=("llama", "qwen2"))
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=44)
    p.add_argument("--autocast", choices=("bf16",), default=None, help="run under CPU bf16 autocast")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mllm_kd.model.lean import lean_decoder_ops

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        args.arch,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=1,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=128,
        max_position_embeddings=max(128, args.tokens),
    )
    llm = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").train()
    layer = llm.model.layers[0]
    x = torch.randn(args.batch, args.tokens, args.hidden, requires_grad=True)
    pos_emb = llm.model.rotary_emb(x, torch.arange(args.tokens)[None].expand(args.batch, -1))
    dtype = torch.bfloat16 if args.autocast == "bf16" else None
    totals = {}
    for name in ("eager", "lean"):
        if name == "lean":
            lean_decoder_ops(llm)
        saved = saved_storages(layer, x, pos_emb, dtype)
        totals[name] = sum(n for n, _, _ in saved.values())
        print(f"{name}: {totals[name] / 2**20:.2f} MiB saved for the backward")
        for n, made, shape in saved.values():
            print(f"  {n / 2**20:8.2f} MiB  {made:32s} {shape}")
    print(
        json.dumps(
            {"arch": args.arch, "autocast": args.autocast, **{f"{k}_bytes": v for k, v in totals.items()}}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
