"""Benchmark: the cost of an on-policy stage-3 step (GKD, ``loss.on_policy_fraction=1``) against the usual one.

    python bench/on_policy.py                                   # SmolLM2 shapes at 1/5 depth, CPU (~2 min, 2 cores)
    python bench/on_policy.py --layers-scale 1 --device cuda    # the main job's full shapes

Both trainers are the stages' own :class:`~mllm_kd.train.trainer.Trainer` (as in bench/step.py, whose shapes,
batches and model builders this reuses), from the same random weights, in one process, their timed steps
interleaved (off, on, off, on, ...) so that a change in the machine's load hits both alike:

* ``off_policy``: the data set's responses; CE + MDist_resp + MDist_vis + RDist, teacher forward, AdamW.
* ``on_policy``: the student first samples a response for every sample (``generation.max_new_tokens``, KV
  cache, batched); then the same step on it, without CE.

A random student rarely produces a stop token, so every on-policy response is ``--max-new-tokens`` long: the
figure is the cost at that length (a trained student that stops earlier costs less). The last line printed is
one JSON object: median step times, their ratio (``on_policy_vs_off``; ``on_policy_vs_off_fastest`` is the
ratio of the fastest steps, which other processes on a shared machine disturb least), the same ratio in
CPU seconds of the process (``on_policy_vs_off_cpu``: a shared machine's load changes it least, with
``--threads 1`` least of all), the share of the on-policy step spent generating, and the response lengths.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:  # run as a script from a checkout
        sys.path.insert(0, str(p))


def parse_args(argv=None) -> argparse.Namespace:
    import step as bench_step

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(bench_step.PRESETS), default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers-scale", type=float, default=0.2, help="scale both LLMs' depth")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=None, help="tokens per sample (default: the preset's)")
    p.add_argument("--response", type=int, default=None, help="the data set's response tokens per sample")
    p.add_argument("--max-new-tokens", type=int, default=8, help="generation.max_new_tokens")
    p.add_argument("--temperature", type=float, default=1.0, help="generation.temperature")
    p.add_argument("--steps", type=int, default=5, help="timed steps of each kind (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    preset = bench_step.PRESETS[args.preset]
    args.tokens = args.tokens or preset["tokens"]
    args.response = args.response or preset["response"]
    args.set, args.worker, args.chunk_size = [], None, None  # what bench/step.py's builders read
    return args


def main(argv=None) -> dict:
    import dataclasses
    import tempfile

    import step as bench_step
    import torch

    from mllm_kd.data.datasets import TrainData
    from mllm_kd.model.multimodal import apply_trainable
    from mllm_kd.model.tokenization import image_token_id
    from mllm_kd.runtime.plan import plan_run
    from mllm_kd.train import on_policy as on_policy_module
    from mllm_kd.train.trainer import Trainer

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = bench_step.make_tokenizer(work)
        cfg = bench_step.stage3_config(args, work)
        student, teacher, _ = bench_step.build_models(args, cfg, tok)
        n_vis = student.num_visual_tokens
        image_size = student.vision.image_size
        batches = bench_step.make_batches(
            args, image_token_id(tok), len(tok), student.vocab_size, n_vis, image_size
        )
        trainers, generated, gen_time = {}, [], []
        real_sample = on_policy_module.sample_tokens

        def timed_sample(*a, **k):  # the generation's share of the on-policy step
            t0 = time.perf_counter()
            out = real_sample(*a, **k)
            bench_step._sync(args.device)
            gen_time.append(time.perf_counter() - t0)
            generated.extend(len(x) for x in out)
            return out

        on_policy_module.sample_tokens = timed_sample
        for name, fraction in (("off_policy", 0.0), ("on_policy", 1.0)):
            c = copy.deepcopy(cfg)
            c.loss.on_policy_fraction = fraction
            c.generation.max_new_tokens, c.generation.temperature = args.max_new_tokens, args.temperature
            s = copy.deepcopy(student)
            apply_trainable(s, c.trainable)
            plan = dataclasses.replace(plan_run(c, distill=True), teacher="model")
            t = Trainer(c, plan, s, teacher, TrainData(None, None, len(batches) * args.batch), tok, c.model)
            t.model.train()
            s.vision.train(False)
            trainers[name] = t
        times = {name: [] for name in trainers}
        cpu = {name: [] for name in trainers}
        for i, batch in enumerate(batches):
            for name, t in trainers.items():
                if name == "on_policy":
                    gen_time.clear()
                bench_step._sync(args.device)
                t0, c0 = time.perf_counter(), time.process_time()
                _, bad = t._accumulate(iter([(batch, 1)]))
                if bad:
                    raise SystemExit(bad)
                t._optimizer_step(skip=False)
                t.state.step += 1
                bench_step._sync(args.device)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
                    if name == "on_policy":
                        times.setdefault("generation", []).append(sum(gen_time))
        on_policy_module.sample_tokens = real_sample
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "load_1min": os.getloadavg()[0],
        "shapes": {
            "student_layers": cfg.model.llm.config["num_hidden_layers"],
            "teacher_layers": bench_step.shapes(args)["teacher"]["num_hidden_layers"],
            "batch": args.batch,
            "tokens": args.tokens,
            "visual_tokens": n_vis,
            "response": args.response,
            "max_new_tokens": args.max_new_tokens,
        },
        "off_policy_step_s": round(med["off_policy"], 4),
        "on_policy_step_s": round(med["on_policy"], 4),
        "generation_s": round(med["generation"], 4),
        "on_policy_vs_off": round(med["on_policy"] / med["off_policy"], 3),
        # the fastest step of each kind: less sensitive to other processes' load on a shared machine
        "on_policy_vs_off_fastest": round(min(times["on_policy"]) / min(times["off_policy"]), 3),
        # CPU seconds the process used (all its threads): what the step costs, whoever else runs
        "off_policy_cpu_s": round(statistics.median(cpu["off_policy"]), 4),
        "on_policy_cpu_s": round(statistics.median(cpu["on_policy"]), 4),
        "on_policy_vs_off_cpu": round(
            statistics.median(cpu["on_policy"]) / statistics.median(cpu["off_policy"]), 3
        ),
        "generation_share_of_on_policy_step": round(med["generation"] / med["on_policy"], 3),
        "mean_response_tokens": round(sum(generated) / max(len(generated), 1), 2),
        "off_policy_spread_s": [round(min(times["off_policy"]), 4), round(max(times["off_policy"]), 4)],
        "on_policy_spread_s": [round(min(times["on_policy"]), 4), round(max(times["on_policy"]), 4)],
        "steps": args.steps,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
