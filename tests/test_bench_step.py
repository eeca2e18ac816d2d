"""bench/step.py: its FLOP formula against real models, and a tiny run of every CPU variant."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "bench" / "step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("which", ["smollm2", "paper"])
def test_parameter_counts_match_the_models(which):
    """The N of the MFU formula equals the decoder + head parameters of the model transformers builds."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    step = _bench()
    preset = step.PRESETS[which]
    small = {**preset["student"], "num_hidden_layers": 2, "vocab_size": 1000, "tie_word_embeddings": False}
    kwargs = dict(small)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(kwargs.pop("model_type"), **kwargs))
    embed = llm.get_input_embeddings().weight.numel()
    final_norm = llm.get_decoder().norm.weight.numel()
    assert step._llm_params(small) == sum(p.numel() for p in llm.parameters()) - embed - final_norm
    vision = {**preset["vision"], "num_hidden_layers": 2}
    vkw = dict(vision)
    with torch.device("meta"):
        tower = AutoModel.from_config(AutoConfig.for_model(vkw.pop("model_type"), **vkw))
    matmul = sum(
        m.weight.numel()
        for m in tower.modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and "head" not in type(m).__name__.lower()
    )
    encoder = sum(
        m.weight.numel()
        for n, m in tower.named_modules()
        if isinstance(m, torch.nn.Linear) and "encoder" in n
    )
    patch = sum(m.weight.numel() for m in tower.modules() if isinstance(m, torch.nn.Conv2d))
    # the formula counts the encoder's linears and the patch embedding (norms, biases and the pooling head aside)
    assert step._vision_params(vision) == encoder + patch
    assert matmul >= encoder + patch


def test_cached_step_leaves_the_teacher_out():
    step = _bench()
    args = step.parse_args(["--preset", "paper"])
    online, cached = step.step_flops(args, cached=False), step.step_flops(args, cached=True)
    assert online["total"] == sum(v for k, v in online.items() if k != "total")
    assert online["total"] - cached["total"] == (
        online["teacher_llm"] + online["teacher_projector"] + online["teacher_vision"]
    )
    # Qwen2.5-3B's forward costs about 6x the 0.5B student's per token (the paper's ratio)
    t, s = (
        step._llm_params(step.PRESETS["paper"]["teacher"]),
        step._llm_params(step.PRESETS["paper"]["student"]),
    )
    assert 5 < t / s < 7


def _tiny_run(variants: str) -> dict:
    """bench/step.py's CPU dry run (a SmolLM2-shaped pair at 7% of its depth, batch 2, one timed step)."""
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "step.py"),
        "--preset",
        "smollm2",
        "--layers-scale",
        "0.07",
        "--batch",
        "2",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--variants",
        variants,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tiny_run_of_the_stages_step_against_plain_transformers():
    """The default run's share of the dry run below: mllm_kd's step, the same step without the lean decoder
    ops, and plain transformers: the same loss and step from the same weights, every figure filled in."""
    res = _tiny_run("mllm_kd,plain,mllm_kd_eager_ops")
    assert set(res["variants"]) == {"mllm_kd", "plain", "mllm_kd_eager_ops"}
    for name, v in res["variants"].items():
        assert "error" not in v, (name, v)
        assert v["median_s"] > 0 and v["peak_total_bytes"] > v["peak_step_bytes"] > 0
        assert 0 < v["mfu"] < 1
    assert abs(res["loss_vs_plain"]) < 1e-5
    assert abs(res["loss_lean_vs_eager_ops"]) < 1e-6 and res["memory_lean_vs_eager_ops"] > 0
    first = res["variants"]["mllm_kd"]["first_step"]
    assert set(first) >= {"ce", "mdist_resp", "mdist_vis", "rdist"}
    for k in first:
        assert res["variants"]["mllm_kd_eager_ops"]["first_step"][k] == pytest.approx(
            first[k], rel=1e-5, abs=1e-7
        ), k
    assert res["speed_vs_plain"] > 0 and res["memory_vs_plain"] > 0


@pytest.mark.slow  # about 2 minutes on 2 CPU cores (train.compile alone ~30 s): `make test-all`
def test_tiny_run_of_every_cpu_variant():
    """The CPU dry run: mllm_kd (eager, train.compile, train.gradient_checkpointing, without the lean decoder
    ops), its cached teacher and plain transformers (with and without activation checkpointing); the same loss
    from the same weights."""
    res = _tiny_run(
        "mllm_kd,mllm_kd_cached,plain,mllm_kd_compiled,mllm_kd_ckpt,mllm_kd_no_ckpt,plain_ckpt,mllm_kd_eager_ops"
    )
    assert set(res["variants"]) == {
        "mllm_kd",
        "mllm_kd_cached",
        "plain",
        "mllm_kd_compiled",
        "mllm_kd_ckpt",
        "mllm_kd_no_ckpt",
        "plain_ckpt",
        "mllm_kd_eager_ops",
    }
    # on a CPU the stages' default checkpoints the student's layers (train.gradient_checkpointing=null)
    ckpt = {name: v["checkpoint_layers"] for name, v in res["variants"].items()}
    assert ckpt["mllm_kd"] and ckpt["mllm_kd_ckpt"] and ckpt["plain_ckpt"] and ckpt["mllm_kd_cached"]
    assert not ckpt["mllm_kd_no_ckpt"] and not ckpt["plain"]
    for name, v in res["variants"].items():
        assert "error" not in v, (name, v)
        assert v["median_s"] > 0 and v["peak_total_bytes"] > v["peak_step_bytes"] > 0
        assert 0 < v["mfu"] < 1
    # same weights, same batch: the plain transformers loss equals the stages' fused loss
    assert abs(res["loss_vs_plain"]) < 1e-5
    first = res["variants"]["mllm_kd"]["first_step"]
    compiled = res["variants"]["mllm_kd_compiled"]["first_step"]
    for k in first:  # train.compile changes the kernels, not the step
        assert compiled[k] == pytest.approx(first[k], rel=1e-4, abs=1e-6), k
    for k in first:  # checkpointing recomputes the same activations
        for v in ("mllm_kd_ckpt", "mllm_kd_no_ckpt"):
            assert res["variants"][v]["first_step"][k] == pytest.approx(first[k], rel=1e-6, abs=1e-7), (v, k)
    assert abs(res["loss_lean_vs_eager_ops"]) < 1e-6 and res["memory_lean_vs_eager_ops"] > 0
    for k in first:  # the lean RMSNorm / MLP compute the same step as transformers' forwards
        assert res["variants"]["mllm_kd_eager_ops"]["first_step"][k] == pytest.approx(
            first[k], rel=1e-5, abs=1e-7
        ), k
    # like for like (both checkpointed) and across (mllm_kd_ckpt against plain without it), next to the
    # unchanged mllm_kd-against-plain ratios
    for key in ("ckpt_vs_plain_ckpt", "ckpt_vs_plain", "no_ckpt_vs_plain"):
        assert res[f"speed_{key}"] > 0 and res[f"memory_{key}"] > 0, key
        assert abs(res[f"loss_{key}"]) < 1e-5, key
    plain, plain_ckpt = res["variants"]["plain"], res["variants"]["plain_ckpt"]
    assert res["memory_ckpt_vs_plain"] == pytest.approx(
        res["variants"]["mllm_kd_ckpt"]["peak_step_bytes"] / plain["peak_step_bytes"]
    )
    assert res["speed_ckpt_vs_plain_ckpt"] == pytest.approx(
        plain_ckpt["median_s"] / res["variants"]["mllm_kd_ckpt"]["median_s"]
    )
    assert res["memory_vs_plain"] == pytest.approx(
        res["variants"]["mllm_kd"]["peak_step_bytes"] / plain["peak_step_bytes"]
    )
    assert set(first) >= {"ce", "mdist_resp", "mdist_vis", "rdist"}
    assert res["speed_vs_plain"] > 0 and res["memory_vs_plain"] > 0 and res["cached_speedup"] > 0
    assert res["variants"]["mllm_kd_cached"]["model_flops"] < res["variants"]["mllm_kd"]["model_flops"]


def test_memory_breakdown_attributes_live_tensors():
    """bench/step.py --memory-breakdown: activations by module at the forward's peak, parameter gradients
    told apart from the backward's temporaries, nothing counted that existed before the step."""
    sys.path.insert(0, str(ROOT / "bench"))
    from step_memory import measure

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.SiLU(), torch.nn.Linear(1024, 256))
    opt = torch.optim.AdamW(mlp.parameters())
    x = torch.randn(512, 256)

    def step(batch):
        mlp(batch).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(mlp.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(x)  # AdamW's state exists before the measured step, as in the benchmark
    res = measure(step, x, {"mlp": mlp}, mlp.parameters())
    f32 = 4
    forward = res["phases"]["forward"]["by_label"]
    # two [512, 1024] activations (Linear, SiLU) and the [512, 256] output; the loss's square
    assert forward["mlp"] == (2 * 512 * 1024 + 512 * 256) * f32
    assert forward["loss"] == 512 * 256 * f32 + f32
    grads = sum(p.numel() for p in mlp.parameters()) * f32
    assert res["phases"]["clipping + optimizer"]["by_label"]["parameter gradients, backward"] == grads
    assert res["peak_bytes"] == max(p["peak_bytes"] for p in res["phases"].values())
