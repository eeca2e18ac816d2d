"""Benchmark: one whole stage-3 (DFT) training step, mllm_kd against the code users write instead.

    python bench/step.py --preset smollm2                      # the main job's shapes, on the CPU (~3 min, 2 cores)
    python bench/step.py --preset paper --device cuda          # Qwen2.5-3B -> 0.5B, SigLIP-so400m/14 @ 384 px

One step = student forward + backward, teacher forward, CE + MDist (response and visual positions) + RDist,
gradient clipping at 1.0 and the AdamW step. Every variant trains the same student from the same random
weights on the same batches (fixed seed), each in a fresh process:

* ``mllm_kd``: the stages' own code path. The stage-3 config is resolved as ``python -m mllm_kd.stage3``
  resolves it, :class:`mllm_kd.train.trainer.Trainer` is built as :func:`mllm_kd.train.stage.run_stage` builds it, and
  each step is the trainer's own ``_accumulate`` (autocast, :class:`~mllm_kd.train.objective.LossComputer`, which
  picks the fused chunked losses) and ``_optimizer_step`` (clipping, AdamW, scheduler).
* ``mllm_kd_cached``: the same with the teacher cache (``teacher.cache``): the teacher is run once over the
  batches beforehand, its top-k log-probabilities and relation factors written to a cache directory, then
  freed; the step reads the cache (:class:`mllm_kd.teacher.cache.CachedTeacher`) instead of running it.
* ``plain``: what a user writes without this project, the LLaVA-KD / TRL way: transformers'
  ``LlavaForConditionalGeneration`` for teacher and student (the same weights, converted by
  :func:`mllm_kd.checkpoint.hf_llava.build_hf_llava`), full-vocabulary logits, ``F.cross_entropy``,
  ``F.kl_div(log_softmax(z_S), log_softmax(z_T), log_target=True, reduction="batchmean")`` at the response
  and at the visual positions, RDist as ``1 - cos`` of the visual logits' Gram matrices, torch's AdamW with
  its default implementation.
* ``mllm_kd_compiled`` (only when asked for with ``--variants``): ``mllm_kd`` with ``train.compile=true``
  (each decoder layer of student and teacher through ``torch.compile``; the first warm-up step compiles).
* ``mllm_kd_ckpt``: ``mllm_kd`` with ``train.gradient_checkpointing=true`` (each student decoder layer
  recomputed in the backward pass). The stages' default (``null``) turns it on for a CPU and off on CUDA, so
  on a CPU ``mllm_kd`` is this variant and ``mllm_kd_no_ckpt`` (``train.gradient_checkpointing=false``)
  the step without it; on CUDA ``mllm_kd`` runs without it. Each variant's JSON says which
  (``checkpoint_layers``).
* ``mllm_kd_eager_ops`` (only when asked for with ``--variants``): ``mllm_kd`` with
  ``train.lean_activations=false`` (the student's RMSNorms and SwiGLU MLPs as transformers runs them, keeping
  every intermediate for the backward; mllm_kd/model/lean.py).
* ``plain_ckpt``: ``plain`` with transformers' activation checkpointing of the student
  (``gradient_checkpointing_enable()``, which LLaVA's and TinyLLaVA's training scripts turn on by default).
* ``liger`` (CUDA only): the plain models run to their final hidden states, and the student's CE and both
  MDist terms go through liger-kernel's ``LigerFusedLinearCrossEntropyLoss`` and ``LigerFusedLinearJSD``
  (``jsd_beta=0``: forward KL); RDist from the logits at the visual positions only.

With the same weights and batches the variants compute the same loss: the table prints each one's first-step
loss, and the JSON its relative difference from ``plain``'s.

Model FLOPs of a step (the formula of the MFU; PaLM's convention, attention counted without the causal
saving, embeddings left out; the LM head counted only at the positions that have a loss term, the response
and the visual positions, since the objective needs no logits elsewhere: what ``plain`` computes beyond
them is waste, not model FLOPs):

    student LLM, trained:       6 * N_s * tokens + 6 * V d_s * rows + 12 * L_s * d_s * T * tokens
    teacher LLM, forward only:  2 * N_t * tokens + 2 * V d_t * rows +  4 * L_t * d_t * T * tokens
                                                                            (not in mllm_kd_cached)
    projector, trained:         6 * N_proj * visual tokens          (the teacher's: 2 * N_proj * visual tokens)
    vision towers, forward:     2 * N_vis * patches per image, for each model that runs one

with N the parameters of the decoder layers, V d the LM head's, ``rows`` the positions with a loss term,
L the layers, d the hidden width, T the sequence length. MFU = model FLOPs / step time / the device's dense matmul peak, measured in the same run (a square
matmul in the step's compute dtype; float32 on a CPU, bfloat16 on CUDA).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the timed steps; on a CPU the resident-set
high-water mark (``VmHWM`` after ``/proc/self/clear_refs``), see bench/kd_loss.py. The table gives both the
total peak and the peak above what is allocated before a step (the models, the optimizer state, the batch:
the same for every variant but the cached one, which holds no teacher). ``memory_vs_plain`` is the ratio of
the latter, ``total_memory_vs_plain`` of the former.

The MFU of the checkpointed variants counts the same model FLOPs (the recomputed forward is overhead, as
in PaLM's definition).

``--memory-breakdown`` runs one more step per variant with every tensor the step creates tracked
(bench/step_memory.py) and prints, for the forward, the backward and the optimizer phase, what is live at
that phase's peak: activations by model part, the loss's buffers, gradients, temporaries.

The LAST line printed is one JSON object: ``speed_vs_plain`` (plain step time / mllm_kd step time),
``memory_vs_plain``, ``total_memory_vs_plain``, ``mfu`` (mllm_kd's), ``cached_speedup`` (mllm_kd step time /
mllm_kd_cached step time); with activation checkpointing, like for like ``speed_ckpt_vs_plain_ckpt`` /
``memory_ckpt_vs_plain_ckpt`` (mllm_kd_ckpt against plain_ckpt) and across ``speed_ckpt_vs_plain`` /
``memory_ckpt_vs_plain`` (mllm_kd_ckpt against plain without it), each with ``total_memory_*`` and
``loss_*``; without it, ``*_no_ckpt_vs_plain`` (mllm_kd_no_ckpt against plain); with ``mllm_kd_eager_ops``, ``speed_lean_vs_eager_ops`` / ``memory_lean_vs_eager_ops`` (mllm_kd
against it); on CUDA ``speed_vs_liger`` and ``memory_vs_liger``; and every variant's figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:  # run as a script from a checkout
        sys.path.insert(0, str(p))

VARIANTS = (
    "mllm_kd",
    "mllm_kd_cached",
    "plain",
    "liger",
    "mllm_kd_compiled",
    "mllm_kd_ckpt",
    "mllm_kd_no_ckpt",
    "plain_ckpt",
    "mllm_kd_eager_ops",
)
DEFAULT_VARIANTS = (
    "mllm_kd",
    "mllm_kd_cached",
    "plain",
    "liger",
    "mllm_kd_ckpt",
    "mllm_kd_no_ckpt",
    "plain_ckpt",
)


def _llama(layers: int) -> dict:  # SmolLM2-135M-Instruct's architecture
    return {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": layers,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    }


def _qwen2(hidden: int, inter: int, layers: int, heads: int) -> dict:  # Qwen2.5's architecture
    return {
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    }


def _siglip(hidden: int, inter: int, layers: int, heads: int, image: int, patch: int) -> dict:
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "image_size": image,
        "patch_size": patch,
    }


PRESETS = {
    # The main job (configs/easyvqa.yaml): SmolLM2-135M-Instruct teacher (30 layers), its 10-layer student,
    # stage-3 batch 16; 4 visual tokens per 64-px image. The main job's MobileNetV2 tower is replaced by a small
    # SigLIP giving the same 4 tokens (HF LLaVA, the plain variant, holds only transformers' vision models);
    # either costs under 0.1% of the step. Tokens per sample: the demo's longest stage-3 sample (44; mean 40), 3 of them answer labels.
    "smollm2": {
        "student": _llama(10),
        "teacher": _llama(30),
        "vision": _siglip(256, 1024, 2, 4, 64, 32),
        "batch": 16,
        "tokens": 44,
        "response": 3,
        "device": "cpu",
    },
    # LLaVA-KD's setting: Qwen2.5-3B teacher, Qwen2.5-0.5B student, SigLIP-so400m/14 at 384 px (729 visual
    # tokens), 2,048 tokens per sample, half of the text after the image a response (multi-turn LLaVA-665K).
    "paper": {
        "student": _qwen2(896, 4864, 24, 14),
        "teacher": _qwen2(2048, 11008, 36, 16),
        "vision": _siglip(1152, 4304, 27, 16, 384, 14),
        "batch": 4,
        "tokens": 2048,
        "response": 660,
        "device": "cuda",
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="smollm2")
    p.add_argument("--device", default=None, help="cpu / cuda (default: the preset's)")
    p.add_argument("--batch", type=int, default=None, help="samples per step (default: the preset's)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per sample (default: the preset's)")
    p.add_argument("--response", type=int, default=None, help="response tokens per sample")
    p.add_argument("--layers-scale", type=float, default=1.0, help="scale both LLMs' depth (quick trials)")
    p.add_argument("--vision-layers", type=int, default=None, help="the vision tower's depth (quick trials)")
    p.add_argument("--vocab", type=int, default=None, help="both LLMs' vocabulary size (quick trials)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="fresh processes per variant, in alternating order; the table gives the median of their medians",
    )
    p.add_argument("--variants", default=None, help="comma-separated subset (default: all that run here)")
    p.add_argument("--chunk-size", type=int, default=None, help="loss.chunk_size (default: the stage's)")
    p.add_argument("--k", type=int, default=32, help="teacher.cache_topk of the cached variant")
    p.add_argument("--relation-rank", type=int, default=32, help="teacher.cache_relation_rank")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="stage-3 override")
    p.add_argument(
        "--profile", action="store_true", help="print torch.profiler's table of one step per variant"
    )
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument(
        "--memory-breakdown",
        action="store_true",
        help="one more step per variant with the live tensors tracked: what is live at the peak (bench/step_memory.py)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    args.device = args.device or preset["device"]
    args.batch = args.batch or preset["batch"]
    args.tokens = args.tokens or preset["tokens"]
    args.response = args.response or preset["response"]
    return args


# --------------------------------------------------------------------------------------------- shapes
def _scaled(cfg: dict, scale: float) -> dict:
    return {**cfg, "num_hidden_layers": max(1, round(cfg["num_hidden_layers"] * scale))}


def shapes(args) -> dict:
    preset = PRESETS[args.preset]
    vocab = {"vocab_size": args.vocab} if args.vocab else {}
    vision_layers = {"num_hidden_layers": args.vision_layers} if args.vision_layers else {}
    return {
        "student": _scaled({**preset["student"], **vocab}, args.layers_scale),
        "teacher": _scaled({**preset["teacher"], **vocab}, args.layers_scale),
        "vision": {**preset["vision"], **vision_layers},
    }


def _llm_params(c: dict) -> int:
    """Decoder-layer and LM-head parameters (embeddings aside) of a Llama / Qwen2 config."""
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = d * c["num_key_value_heads"] // c["num_attention_heads"]
    attn = (
        d * d + 2 * d * kv + d * d + (2 * kv + d if c["model_type"] == "qwen2" else 0)
    )  # q, k, v, o (+bias)
    return c["num_hidden_layers"] * (attn + 3 * d * f + 2 * d) + v * d


def _vision_params(c: dict) -> int:
    d, f, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    return n * (4 * d * d + 2 * d * f) + 3 * c["patch_size"] ** 2 * d


def step_flops(args, cached: bool) -> dict:
    """Model FLOPs of one step, by part (the formula in the module docstring)."""
    sh = shapes(args)
    s, t, v = sh["student"], sh["teacher"], sh["vision"]
    B, T = args.batch, args.tokens
    n_vis = (v["image_size"] // v["patch_size"]) ** 2
    tokens = B * T
    rows = B * (n_vis + args.response)  # positions with a loss term: the visual and the response positions
    head_s, head_t = s["vocab_size"] * s["hidden_size"], t["vocab_size"] * t["hidden_size"]
    proj_s = v["hidden_size"] * s["hidden_size"] + s["hidden_size"] ** 2
    proj_t = v["hidden_size"] * t["hidden_size"] + t["hidden_size"] ** 2
    attn_s = 12 * s["num_hidden_layers"] * s["hidden_size"] * T * tokens
    attn_t = 4 * t["num_hidden_layers"] * t["hidden_size"] * T * tokens
    parts = {
        "student_llm": 6 * (_llm_params(s) - head_s) * tokens + 6 * head_s * rows + attn_s,
        "student_projector": 6 * proj_s * B * n_vis,
        "student_vision": 2 * _vision_params(v) * B * n_vis,
    }
    if not cached:
        parts["teacher_llm"] = 2 * (_llm_params(t) - head_t) * tokens + 2 * head_t * rows + attn_t
        parts["teacher_projector"] = 2 * proj_t * B * n_vis
        parts["teacher_vision"] = 2 * _vision_params(v) * B * n_vis
    parts["total"] = sum(parts.values())
    return parts


def matmul_peak(device: str, dtype_name: str) -> float:
    """FLOP/s of a square matmul on random data (median of timed repeats after a warm-up)."""
    import torch

    dtype = getattr(torch, dtype_name)
    n = 8192 if device == "cuda" else 1536
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(13 if device == "cuda" else 6):
        _sync(device)
        t0 = time.perf_counter()
        (a @ b)
        _sync(device)
        if i >= 3 if device == "cuda" else i >= 1:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------- fixtures
def make_tokenizer(work: Path):
    from mllm_kd.model.tokenization import load_tokenizer, train_bpe_tokenizer

    words = [
        "a",
        "photo",
        "of",
        "the",
        "red",
        "blue",
        "green",
        "shape",
        "circle",
        "square",
        "triangle",
        "what",
        "color",
        "is",
        "it",
        "yes",
        "no",
    ]
    train_bpe_tokenizer([" ".join(words)] * 4, work / "tokenizer", vocab_size=300)
    return load_tokenizer(work / "tokenizer")


def make_batches(
    args, image_token_id: int, n_tok: int, vocab: int, n_vis: int, image_size: int
) -> list[dict]:
    """``--warmup + --steps`` batches: [BOS-ish prefix][image][prompt][response], fixed length, no padding."""
    import torch

    g = torch.Generator().manual_seed(args.seed)
    B, T, R = args.batch, args.tokens, args.response
    prefix = 2
    if prefix + n_vis + 1 + R > T:
        raise SystemExit(f"--tokens {T} is too short for {n_vis} visual and {R} response tokens")
    batches = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(n_tok, vocab, (B, T), generator=g)  # ids above the tokenizer's own: no <image>
        ids[:, prefix : prefix + n_vis] = image_token_id
        labels = torch.full((B, T), -100, dtype=torch.long)
        labels[:, T - R :] = ids[:, T - R :]
        batches.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones(B, T, dtype=torch.long),
                "labels": labels,
                "pixel_values": torch.randn(B, 3, image_size, image_size, generator=g),
                "ids": [f"s{step}-{b}" for b in range(B)],
                "skipped": 0,
            }
        )
    return batches


def stage3_config(args, work: Path):
    from mllm_kd.recipe import resolve_stage_config
    from mllm_kd.stages import stage3

    sh = shapes(args)
    recipe = {
        "run_dir": str(work / "run"),
        "model": {
            "vision": {"backend": "hf", "config": sh["vision"], "feature_layer": -2, "drop_cls": False},
            "llm": {"config": sh["student"]},
            "tokenizer": str(work / "tokenizer"),
        },
        "train": {"batch_size": args.batch, "device": args.device, "progress": False, "max_steps": 1000},
    }
    overrides = ["init_from=null", *list(args.set)]
    if args.worker == "mllm_kd_compiled":
        overrides.append("train.compile=true")
    if args.worker == "mllm_kd_ckpt":
        overrides.append("train.gradient_checkpointing=true")
    if args.worker == "mllm_kd_no_ckpt":
        overrides.append("train.gradient_checkpointing=false")
    if args.worker == "mllm_kd_eager_ops":
        overrides.append("train.lean_activations=false")
    if args.chunk_size:
        overrides.append(f"loss.chunk_size={args.chunk_size}")
    return resolve_stage_config(recipe, "stage3", stage3.DEFAULTS, overrides, source="bench/step.py")


def build_models(args, cfg, tok):
    """Teacher and student MultimodalLMs (random, seeded); the student shares the teacher's vision tower weights."""
    import copy

    import torch

    from mllm_kd.config import LLMConfig
    from mllm_kd.model.multimodal import build_model
    from mllm_kd.model.tokenization import image_token_id

    sh = shapes(args)
    image_id = image_token_id(tok)
    vocab = sh["student"]["vocab_size"]
    torch.manual_seed(args.seed)
    with torch.device(args.device):  # random init on the device: seconds instead of minutes for 3B
        t_cfg = copy.deepcopy(cfg.model)
        t_cfg.llm = LLMConfig(config=sh["teacher"])
        teacher = build_model(t_cfg, image_id, vocab, device=args.device)
        student = build_model(cfg.model, image_id, vocab, device=args.device)
    student.vision.load_state_dict(teacher.vision.state_dict())
    return student, teacher, t_cfg


# -------------------------------------------------------------------------------------------- memory
class Memory:
    """Peak memory of the timed steps: total, and above what was allocated before each step."""

    def __init__(self, device: str):
        self.device, self.total, self.step = device, 0, 0

    def before(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            from kd_loss import _reset_peak_rss, _rss_kib, _trim_heap

            _trim_heap()
            _reset_peak_rss()
            self.base = (_rss_kib("VmRSS") or 0) * 1024

    def after(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            from kd_loss import _rss_kib

            peak = (_rss_kib("VmHWM") or 0) * 1024
        self.total = max(self.total, peak)
        self.step = max(self.step, peak - self.base)


# -------------------------------------------------------------------------------------------- workers
def _mllm_kd_step(args, cfg, student, teacher, tok, batches, work: Path, cached: bool):
    """Returns ``step(batch) -> loss`` running the stages' Trainer; ``cached``: through a teacher cache."""
    import torch

    from mllm_kd.data.datasets import TrainData
    from mllm_kd.model.multimodal import apply_trainable
    from mllm_kd.runtime.plan import plan_run
    from mllm_kd.train.trainer import Trainer

    apply_trainable(student, cfg.trainable)
    if cached:
        teacher = write_cache(args, cfg, teacher, batches, work / "cache")
        torch.cuda.empty_cache() if args.device == "cuda" else None
    plan = dataclasses.replace(plan_run(cfg, distill=True), teacher="cache" if cached else "model")
    trainer = Trainer(
        cfg, plan, student, teacher, TrainData(None, None, len(batches) * args.batch), tok, cfg.model
    )
    trainer.model.train()
    student.vision.train(False)
    losses = []

    def step(batch):
        sums, bad = trainer._accumulate(iter([(batch, 1)]))
        if bad:
            raise SystemExit(bad)
        trainer._optimizer_step(skip=False)
        losses.append(sums["loss"])
        return sums

    step.modules = {
        "student vision tower": student.vision,
        "student projector": student.projector,
        "student LLM forward": student.llm.get_decoder(),
    }
    if not cached:
        step.modules["teacher forward"] = teacher
    step.params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    step.checkpoint_layers = plan.checkpoint_layers
    return step, trainer.device


def write_cache(args, cfg, teacher, batches, out: Path):
    """The teacher's cache of ``batches``, written by the cache builder's own writer, opened as stages open it."""
    import torch

    from mllm_kd.losses.head import head_gram
    from mllm_kd.runtime.plan import plan_run
    from mllm_kd.teacher.build import CacheWriter, _index_dtype, teacher_rows
    from mllm_kd.teacher.cache import open_cache
    from mllm_kd.teacher.cache_format import CACHE_VERSION, MANIFEST

    plan = plan_run(cfg, distill=True)
    teacher.to(plan.device, dtype=plan.weight_dtype).eval().requires_grad_(False)
    head = teacher.llm.get_output_embeddings()
    gram = head_gram(head.weight.detach(), None if head.bias is None else head.bias.detach())
    out.mkdir(parents=True, exist_ok=True)
    with (
        CacheWriter(out, _index_dtype(teacher.vocab_size), teacher.num_visual_tokens) as writer,
        torch.no_grad(),
    ):
        for batch in batches:
            b = {k: v.to(plan.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with plan.autocast():
                writer.add(teacher_rows(teacher, b, args.k, args.relation_rank, gram, cfg.loss.chunk_size))
    manifest = {
        "version": CACHE_VERSION,
        "built_for": {"num_visual_tokens": teacher.num_visual_tokens},
        **writer.describe(args.k, args.relation_rank),
    }
    (out / MANIFEST).write_text(json.dumps(manifest))
    return open_cache(out)


def _plain_models(args, student, teacher, tok, t_cfg, cfg, ckpt: bool = False):
    import torch

    from mllm_kd.checkpoint.hf_llava import build_hf_llava

    with torch.device(args.device):  # built where they run (a 3B model initialised on a CPU takes minutes)
        hs, _ = build_hf_llava(student, tok, cfg.model)
        ht, _ = build_hf_llava(teacher, tok, t_cfg)
    amp = torch.bfloat16 if args.device == "cuda" else None
    hs.to(args.device).train()
    ht.to(args.device, dtype=amp or torch.float32).eval().requires_grad_(False)
    hs.model.vision_tower.requires_grad_(False).eval()  # stage 3: vision frozen, projector + LLM train
    if ckpt:  # what LLaVA's and TinyLLaVA's training scripts (and HF Trainer's gradient_checkpointing) call
        enable = getattr(hs, "activation_checkpointing_enable", None) or hs.gradient_checkpointing_enable
        enable()
    return hs, ht, amp


def _plain_step(args, student, teacher, tok, t_cfg, cfg, use_liger: bool, ckpt: bool = False):
    """Returns ``step(batch) -> loss``: HF LLaVA teacher and student, the loss written out (or liger's);
    ``ckpt``: the student with transformers' activation checkpointing."""
    import torch
    import torch.nn.functional as F

    hs, ht, amp = _plain_models(args, student, teacher, tok, t_cfg, cfg, ckpt)
    del student, teacher
    params = [p for p in hs.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5)
    n_vis = (
        PRESETS[args.preset]["vision"]["image_size"] // PRESETS[args.preset]["vision"]["patch_size"]
    ) ** 2
    image_id = hs.config.image_token_index
    if use_liger:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD

        fl_ce = LigerFusedLinearCrossEntropyLoss()
        fl_kl = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)

    def rdist(zs, zt):
        gs, gt = zs @ zs.transpose(1, 2), zt @ zt.transpose(1, 2)
        return (1 - F.cosine_similarity(gs.flatten(1), gt.flatten(1), dim=-1)).mean()

    def step(batch):
        b = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        ids, attn, px, labels = b["input_ids"], b["attention_mask"], b["pixel_values"], b["labels"]
        vis = ids == image_id
        resp = torch.zeros_like(vis)
        resp[:, :-1] = labels[:, 1:] != -100
        with torch.autocast(args.device, dtype=amp or torch.float32, enabled=amp is not None):
            if not use_liger:
                zs = hs(input_ids=ids, attention_mask=attn, pixel_values=px).logits.float()
                with torch.no_grad():
                    zt = ht(input_ids=ids, attention_mask=attn, pixel_values=px).logits.float()
                V = zs.shape[-1]
                ce = F.cross_entropy(zs[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)

                def kl(mask):
                    return F.kl_div(
                        F.log_softmax(zs[mask], -1),
                        F.log_softmax(zt[mask], -1),
                        log_target=True,
                        reduction="batchmean",
                    )

                terms = {"ce": ce, "mdist_resp": kl(resp), "mdist_vis": kl(vis)}
                terms["rdist"] = rdist(zs[vis].view(-1, n_vis, V), zt[vis].view(-1, n_vis, V))
            else:
                h = hs.model(input_ids=ids, attention_mask=attn, pixel_values=px).last_hidden_state
                with torch.no_grad():
                    th = ht.model(input_ids=ids, attention_mask=attn, pixel_values=px).last_hidden_state
                # liger's kernels take one dtype: the student's float32 master head cast as autocast would
                ws, wt = hs.lm_head.weight.to(h.dtype), ht.lm_head.weight
                d = h.shape[-1]
                ce = fl_ce(ws, h[:, :-1].reshape(-1, d), labels[:, 1:].reshape(-1))

                def kl(mask):
                    rows = h[mask]
                    return fl_kl(
                        rows,
                        ws,
                        th[mask],
                        wt,
                        torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device),
                    )

                terms = {"ce": ce, "mdist_resp": kl(resp), "mdist_vis": kl(vis)}
                zs = (h[vis] @ ws.t()).float().view(-1, n_vis, ws.shape[0])
                zt = (th[vis] @ wt.t()).float().view(-1, n_vis, wt.shape[0])
                terms["rdist"] = rdist(zs, zt)
        total = sum(terms.values())
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in terms.items()}}

    step.modules = {
        "student vision tower": hs.model.vision_tower,
        "student projector": hs.model.multi_modal_projector,
        "student LLM forward": hs.model.language_model,
        "student LM head (logits)": hs.lm_head,
        "teacher forward": ht,
    }
    step.params = params
    return step


def run_worker(args) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    work = Path(tempfile.mkdtemp(prefix="bench_step_"))
    tok = make_tokenizer(work)
    cfg = stage3_config(args, work)
    student, teacher, t_cfg = build_models(args, cfg, tok)
    n_vis = student.num_visual_tokens
    batches = make_batches(
        args, student.image_token_id, len(tok), student.vocab_size, n_vis, student.vision.image_size
    )
    attention = student.llm.config._attn_implementation
    if args.worker.startswith("mllm_kd"):
        step, _ = _mllm_kd_step(
            args, cfg, student, teacher, tok, batches, work, args.worker == "mllm_kd_cached"
        )
        del teacher
    else:
        step = _plain_step(
            args,
            student,
            teacher,
            tok,
            t_cfg,
            cfg,
            use_liger=args.worker == "liger",
            ckpt=args.worker == "plain_ckpt",
        )
        del student, teacher
    import gc

    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    mem = Memory(args.device)
    times, first = [], None
    for i, batch in enumerate(batches):
        mem_on = i >= args.warmup
        if mem_on:
            mem.before()
        _sync(args.device)
        t0 = time.perf_counter()
        terms = step(batch)
        _sync(args.device)
        dt = time.perf_counter() - t0
        if mem_on:
            mem.after()
            times.append(dt)
        first = first or terms
    profile = breakdown = None
    if args.profile:
        profile = _profile(args, step, batches[-1])
    if args.memory_breakdown:
        from step_memory import measure

        breakdown = measure(step, batches[-1], step.modules, step.params)
    return {
        "variant": args.worker,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "peak_total_bytes": mem.total,
        "peak_step_bytes": mem.step,
        "first_step": first,
        "attention": attention,
        "checkpoint_layers": getattr(step, "checkpoint_layers", args.worker == "plain_ckpt"),
        "profile": profile,
        "memory_breakdown": breakdown,
    }


def _profile(args, step, batch) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=acts) as prof:
        step(batch)
        _sync(args.device)
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=args.profile_rows)
    names = sorted({e.key for e in prof.key_averages()})
    attention = [
        n for n in names if any(w in n.lower() for w in ("flash", "fmha", "efficient_attention", "attention"))
    ]
    return table + "\nattention kernels and ops: " + "; ".join(attention[:12])


def _spawn(args, variant: str) -> dict:
    argv = [a for a in sys.argv[1:]]
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", variant]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"variant": variant, "error": tail}
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1])


def _mib(n: float) -> str:
    from kd_loss import _fmt_bytes

    return _fmt_bytes(n)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    import platform

    import torch

    variants = (
        args.variants.split(",")
        if args.variants
        else [v for v in DEFAULT_VARIANTS if v != "liger" or args.device == "cuda"]
    )
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    peaks = {
        d: matmul_peak(args.device, d)
        for d in (("float32", "bfloat16") if args.device == "cuda" else ("float32",))
    }
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    else:
        print(
            f"device: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
        )
    print("matmul peak: " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in peaks.items()))
    sh = shapes(args)
    print(
        f"preset {args.preset}: student {sh['student']['num_hidden_layers']} x {sh['student']['hidden_size']}, "
        f"teacher {sh['teacher']['num_hidden_layers']} x {sh['teacher']['hidden_size']}, V={sh['student']['vocab_size']}, "
        f"batch {args.batch} x {args.tokens} tokens ({args.response} response), {args.steps} timed steps"
    )
    results: dict[str, dict] = {}
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(args.repeats):  # alternating order, so that a drift of the machine's speed hits all
        for v in variants if rep % 2 == 0 else variants[::-1]:
            r = _spawn(args, v)
            if "error" in r:
                print(f"{v}: FAILED: {r['error']}")
                results[v] = r
                continue
            runs[v].append(r)
            print(
                f"{v} (run {rep + 1}): {r['median_s']:.3f} s ({r['min_s']:.3f}-{r['max_s']:.3f}), peak "
                f"{_mib(r['peak_step_bytes'])} in the step / {_mib(r['peak_total_bytes'])} in all, "
                f"{r['attention']} attention",
                flush=True,
            )
            if r.get("profile"):
                print(f"--- profile of {v}\n{r.pop('profile')}")
            if r.get("memory_breakdown"):
                mb = r["memory_breakdown"]
                print(
                    f"--- live tensors at the peak of {v}: {_mib(mb['peak_bytes'])}, during {mb['peak_during']}"
                )
                for phase, ph in mb["phases"].items():
                    print(f"  at the peak of the {phase}: {_mib(ph['peak_bytes'])}")
                    for label, n in ph["by_label"].items():
                        print(f"    {_mib(n):>10}  {label}")
                    largest = "; ".join(f"{_mib(n)} {made} ({label})" for label, n, made in ph["largest"])
                    print(f"    largest: {largest}")
    for v in variants:
        if not runs[v]:
            continue
        medians = [r["median_s"] for r in runs[v]]
        r = {
            **runs[v][0],
            "median_s": statistics.median(medians),
            "min_s": min(r["min_s"] for r in runs[v]),
            "max_s": max(r["max_s"] for r in runs[v]),
            "run_medians": medians,
            "peak_total_bytes": max(r["peak_total_bytes"] for r in runs[v]),
            "peak_step_bytes": max(r["peak_step_bytes"] for r in runs[v]),
        }
        flops = step_flops(args, cached=v == "mllm_kd_cached")["total"]
        r["model_flops"] = flops
        r["tokens_per_s"] = args.batch * args.tokens / r["median_s"]
        r["mfu"] = flops / r["median_s"] / peaks[dtype]
        results[v] = r
    ref = results.get("plain", {})
    print("\n| variant | step (s) | spread | tokens/s | MFU | peak, step | peak, total | first loss |")
    print("|---|---|---|---|---|---|---|---|")
    for v, r in results.items():
        if "error" in r:
            continue
        print(
            f"| {v} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{r['mfu'] * 100:.1f}% | {_mib(r['peak_step_bytes'])} | {_mib(r['peak_total_bytes'])} | "
            f"{r['first_step']['loss']:.5f} |"
        )
    out = {
        "preset": args.preset,
        "device": args.device,
        "dtype": dtype,
        "batch": args.batch,
        "tokens": args.tokens,
        "peak_flops": peaks,
        "flops": step_flops(args, cached=False),
        "variants": results,
    }
    m = results.get("mllm_kd", {})
    if "median_s" in m and "median_s" in ref:
        out["speed_vs_plain"] = ref["median_s"] / m["median_s"]
        out["memory_vs_plain"] = m["peak_step_bytes"] / ref["peak_step_bytes"]
        out["total_memory_vs_plain"] = m["peak_total_bytes"] / ref["peak_total_bytes"]
        out["loss_vs_plain"] = m["first_step"]["loss"] / ref["first_step"]["loss"] - 1
    if "median_s" in m:
        out["mfu"] = m["mfu"]
    for ours, theirs, key in (
        ("mllm_kd_ckpt", "plain_ckpt", "ckpt_vs_plain_ckpt"),  # like for like: both checkpointed
        ("mllm_kd_ckpt", "plain", "ckpt_vs_plain"),  # checkpointed mllm_kd against plain without it
        # mllm_kd without checkpointing (on a CPU the default checkpoints)
        ("mllm_kd_no_ckpt", "plain", "no_ckpt_vs_plain"),
        ("mllm_kd", "mllm_kd_eager_ops", "lean_vs_eager_ops"),  # train.lean_activations on against off
    ):
        a, b = results.get(ours, {}), results.get(theirs, {})
        if "median_s" in a and "median_s" in b:
            out[f"speed_{key}"] = b["median_s"] / a["median_s"]
            out[f"memory_{key}"] = a["peak_step_bytes"] / b["peak_step_bytes"]
            out[f"total_memory_{key}"] = a["peak_total_bytes"] / b["peak_total_bytes"]
            out[f"loss_{key}"] = a["first_step"]["loss"] / b["first_step"]["loss"] - 1
    c = results.get("mllm_kd_cached", {})
    if "median_s" in m and "median_s" in c:
        out["cached_speedup"] = m["median_s"] / c["median_s"]
    lg = results.get("liger", {})
    if "median_s" in m and "median_s" in lg:
        out["speed_vs_liger"] = lg["median_s"] / m["median_s"]
        out["memory_vs_liger"] = m["peak_step_bytes"] / lg["peak_step_bytes"]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
