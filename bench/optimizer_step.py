"""Benchmark: one AdamW step of the student, torch's foreach implementation against its fused kernel.

    OMP_NUM_THREADS=1 python bench/optimizer_step.py                 # SmolLM2-135M's shapes, ~1 min on a CPU
    python bench/optimizer_step.py --device cuda --hidden 896 --intermediate 4864 --layers 24 --vocab 151936

The parameters are those of a Llama/Qwen2-style decoder (tied embeddings; default: SmolLM2-135M, 134.5M
parameters) grouped the way :func:`mllm_kd.train.optim.build_optimizer` groups them (weight decay on matrices
only), with random gradients; each implementation is built by ``build_optimizer`` itself with
``optim.fused=false`` / ``true`` (plus bitsandbytes' ``adamw8bit`` when it is installed and ``--with-8bit``).
Times are the median (and min-max) of ``--repeats`` steps after two warm-up steps. The last line printed is
one JSON object; ``"speedup"`` is foreach / fused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--with-8bit", action="store_true", help="also bitsandbytes' AdamW8bit (optim.name=adamw8bit)"
    )
    return p.parse_args(argv)


def decoder(args):
    import torch
    from torch import nn

    d, f, kv = args.hidden, args.intermediate, args.hidden * args.kv_heads // args.heads
    shapes = {"embed_tokens.weight": (args.vocab, d), "norm.weight": (d,)}
    for i in range(args.layers):
        for name, shape in {
            "q_proj": (d, d),
            "k_proj": (kv, d),
            "v_proj": (kv, d),
            "o_proj": (d, d),
            "gate_proj": (f, d),
            "up_proj": (f, d),
            "down_proj": (d, f),
            "input_layernorm": (d,),
            "post_attention_layernorm": (d,),
        }.items():
            shapes[f"layers.{i}.{name}.weight"] = shape
    module = nn.Module()
    for name, shape in shapes.items():
        module.register_parameter(
            name.replace(".", "_"), nn.Parameter(torch.randn(shape, device=args.device))
        )
    return module


def time_steps(args, name: str, fused: bool | None) -> dict:
    import torch

    from mllm_kd.config import OptimConfig
    from mllm_kd.train.optim import build_optimizer

    model = decoder(args)
    gen = torch.Generator(device=args.device).manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, device=args.device, generator=gen)
    opt = build_optimizer(model, OptimConfig(lr=1e-4, weight_decay=0.1, name=name, fused=fused))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = []
    for i in range(2 + args.repeats):
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {
        "implementation": "adamw8bit"
        if name == "adamw8bit"
        else ("fused" if opt.defaults.get("fused") else "foreach"),
        "params": sum(p.numel() for p in model.parameters()),
        "time_median_s": statistics.median(times),
        "time_min_s": min(times),
        "time_max_s": max(times),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    runs = [("adamw", False), ("adamw", True)] + ([("adamw8bit", None)] if args.with_8bit else [])
    results = [time_steps(args, name, fused) for name, fused in runs]
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(
        f"# one AdamW step over {results[0]['params'] / 1e6:.1f}M parameters ({args.layers} x {args.hidden}, "
        f"V={args.vocab}), device {args.device} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={threads}), median of {args.repeats} steps\n"
    )
    print("| implementation | step time median (ms) | min-max (ms) |")
    print("|---|---|---|")
    for r in results:
        print(
            f"| {r['implementation']} | {r['time_median_s'] * 1e3:.1f} "
            f"| {r['time_min_s'] * 1e3:.1f}-{r['time_max_s'] * 1e3:.1f} |"
        )
    out = {"device": args.device, "results": results}
    out["speedup"] = results[0]["time_median_s"] / results[1]["time_median_s"]
    print(f"\nfused AdamW: {out['speedup']:.2f}x faster per step than foreach")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
