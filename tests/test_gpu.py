"""What only a CUDA device can show: the fused losses on the GPU, a bitsandbytes teacher moved to the GPU
under bf16 autocast, the 8-bit AdamW's CUDA kernels, and the stages end to end in bf16.

Marked ``gpu``: not in the default run. On a CUDA machine: ``python -m pytest -m gpu``.
"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import SMOKE

from mllm_kd.checkpoint.native import resolve_checkpoint
from mllm_kd.cli import stage_config
from mllm_kd.losses import KD_KINDS, kd_divergence, relation_distill
from mllm_kd.losses.fused import fused_kd_divergence, fused_relation_distill
from mllm_kd.model.llm import attention_implementation
from mllm_kd.stages import STAGES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


def _rel(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    scale = want.detach().abs().max().item()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1e-30))


@pytest.mark.parametrize("kind", KD_KINDS)
def test_fused_kd_divergence_equals_reference_on_cuda(kind):
    """float32 on the GPU, a vocabulary that spans several column blocks, a masked subset of positions."""
    g = torch.Generator(device=CUDA).manual_seed(0)
    B, T, V, d_s, d_t = 2, 96, 20000, 64, 96
    hs = torch.randn(B * T, d_s, device=CUDA, generator=g).requires_grad_()
    ws = (torch.randn(V, d_s, device=CUDA, generator=g) * 0.3).requires_grad_()
    ht = torch.randn(B * T, d_t, device=CUDA, generator=g)
    wt = torch.randn(V, d_t, device=CUDA, generator=g) * 0.3
    mask = torch.rand(B, T, device=CUDA, generator=g) < 0.6
    torch.backends.cuda.matmul.allow_tf32 = False
    want = kd_divergence(
        (hs @ ws.t()).view(B, T, V), (ht @ wt.t()).view(B, T, V), mask, kind=kind, temperature=2.0
    )
    want_grads = torch.autograd.grad(want, [hs, ws])
    flat = mask.view(-1)
    got = fused_kd_divergence(hs[flat], ws, ht[flat], wt, kind=kind, temperature=2.0, chunk_size=37)
    got_grads = torch.autograd.grad(got, [hs, ws])
    _rel(got, want, 1e-5)
    for a, b in zip(got_grads, want_grads):
        _rel(a, b, 1e-5)


def test_fused_relation_distill_equals_reference_on_cuda():
    g = torch.Generator(device=CUDA).manual_seed(1)
    B, n, V = 2, 64, 20000
    hs = torch.randn(B, n, 64, device=CUDA, generator=g).requires_grad_()
    ws = (torch.randn(V, 64, device=CUDA, generator=g) * 0.3).requires_grad_()
    ht = torch.randn(B, n, 96, device=CUDA, generator=g)
    wt = torch.randn(V, 96, device=CUDA, generator=g) * 0.3
    has_image = torch.tensor([True, True], device=CUDA)
    torch.backends.cuda.matmul.allow_tf32 = False
    want = relation_distill(hs @ ws.t(), ht @ wt.t(), has_image)
    got = fused_relation_distill(hs, ws, ht, wt, has_image)
    _rel(got, want, 1e-5)
    for a, b in zip(torch.autograd.grad(got, [hs, ws]), torch.autograd.grad(want, [hs, ws])):
        _rel(a, b, 1e-4)


def _smoke_cfg(smoke_teacher, stage, tmp_path, *extra):
    teacher = smoke_teacher / "teacher_sft"
    return stage_config(
        SMOKE,
        stage,
        [
            f"run_dir={tmp_path}",
            f"teacher.checkpoint={teacher}",
            f"model.vision.checkpoint={teacher}",
            f"data_dir={smoke_teacher}/data",
            "train.device=cuda",
            "train.batch_size=4",
            *extra,
        ],
    )


@pytest.mark.parametrize("mode", ["none", "8bit", "4bit"])
def test_stage3_on_cuda_bf16_with_a_quantized_teacher(smoke_teacher, tmp_path, mode, caplog):
    """The trainer moves a (quantised) teacher to the GPU and casts it for bf16 autocast; the 8-bit
    teacher's first-step losses stay within 5% of the float teacher's."""
    pytest.importorskip("bitsandbytes")
    metrics: dict[int, dict] = {}
    out = tmp_path / f"stage3_{mode}"
    with caplog.at_level(logging.INFO):
        STAGES["stage3"].run(
            _smoke_cfg(
                smoke_teacher,
                "stage3",
                tmp_path,
                "init_from=null",
                f"output_dir={out}",
                "train.max_steps=3",
                f"teacher.quantize={mode}",
            ),
            on_step=lambda s, m: metrics.setdefault(s, m),
        )
    assert resolve_checkpoint(out).name == "final"
    assert sorted(metrics) == [1, 2, 3]
    for m in metrics.values():
        assert all(torch.isfinite(torch.tensor(m[k])) for k in ("mdist_resp", "mdist_vis", "rdist"))
    impl = attention_implementation("auto", CUDA)  # flash_attention_2 with flash-attn installed, else sdpa
    assert f"with {impl} attention" in caplog.text


def test_quantized_teacher_logits_on_cuda(smoke_teacher, tmp_path):
    """8-bit and 4-bit teachers on the GPU against the float teacher on the GPU (float32, no autocast)."""
    bnb = pytest.importorskip("bitsandbytes")
    from mllm_kd.data.datasets import Collator, build_train_data
    from mllm_kd.data.encoding import ImageProcessor
    from mllm_kd.teacher.load import load_teacher
    from mllm_kd.train.stage import init_model

    cfg = _smoke_cfg(smoke_teacher, "stage1", tmp_path)
    student, tok, model_cfg = init_model(cfg, cfg.model)
    images = ImageProcessor(
        student.vision.image_size, model_cfg.vision.image_mean, model_cfg.vision.image_std
    )
    data = build_train_data(cfg.data, tok, student.num_visual_tokens, student.image_token_id, images)
    batch = Collator(tok.pad_token_id)([data.dataset[i] for i in range(6)])
    args = [batch[k].to(CUDA) for k in ("input_ids", "attention_mask", "pixel_values")]
    ref_teacher = load_teacher(cfg, student, tok).to(CUDA).eval()
    with torch.no_grad():
        ref = ref_teacher(*args).logits
    mask = args[1].bool()
    for mode, rtol, linear in (("8bit", 1e-2, bnb.nn.Linear8bitLt), ("4bit", 5e-2, bnb.nn.Linear4bit)):
        cfg.teacher.quantize = mode
        teacher = load_teacher(cfg, student, tok).to(CUDA).eval()
        layer = next(m for m in teacher.llm.modules() if isinstance(m, linear))
        assert layer.weight.device.type == CUDA.type
        with torch.no_grad():
            out = teacher(*args).logits.float()
        rel = ((out - ref)[mask].norm() / ref[mask].norm()).item()
        assert rel < rtol, (mode, rel)


def test_adamw8bit_on_cuda_follows_adamw():
    """bitsandbytes' CUDA 8-bit AdamW against torch's AdamW on a least-squares problem: both converge."""
    bnb = pytest.importorskip("bitsandbytes")
    g = torch.Generator(device=CUDA).manual_seed(2)
    x = torch.randn(512, 256, device=CUDA, generator=g)
    y = x @ torch.randn(256, 64, device=CUDA, generator=g)
    finals = {}
    for name, cls in (("adamw", torch.optim.AdamW), ("adamw8bit", bnb.optim.AdamW8bit)):
        w = torch.zeros(256, 64, device=CUDA, requires_grad=True)
        opt = cls([w], lr=1e-2, weight_decay=0.0)
        for _ in range(200):
            loss = ((x @ w - y) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        finals[name] = loss.item()
        if name == "adamw8bit":
            assert opt.state[w]["state1"].dtype == torch.uint8
    start = (y**2).mean().item()
    assert finals["adamw8bit"] < 0.05 * start, finals
    assert finals["adamw8bit"] < 3 * finals["adamw"] + 1e-3 * start, finals


def test_adamw_is_fused_on_cuda_by_default():
    """optim.fused unset: a student on CUDA gets torch's fused AdamW, with the foreach path's values."""
    from mllm_kd.config import OptimConfig
    from mllm_kd.train.optim import build_optimizer

    finals = {}
    for fused in (None, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64)).to(CUDA)
        opt = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1, fused=fused))
        assert bool(opt.defaults["fused"]) == (fused is None)
        g = torch.Generator(device=CUDA).manual_seed(1)
        for _ in range(5):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, device=CUDA, generator=g)
            opt.step()
        finals[fused] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(finals[None], finals[False], rtol=0, atol=1e-5)
