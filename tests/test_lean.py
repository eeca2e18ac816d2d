"""Memory-lean RMSNorm and SwiGLU MLP (mllm_kd/model/lean.py): the same values and gradients as the modules
they replace, fewer bytes kept for the backward, and only where they are recognised."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_memory import _assert_same_step, _batch, _tiny_student, stage1_llm_overrides
from test_memory import _loss_and_grads as _step_loss_and_grads
from torch import nn

from mllm_kd.config import TrainConfig
from mllm_kd.errors import ConfigError
from mllm_kd.model.lean import RMSNormFunction, SwiGLUFunction, lean_decoder_ops
from mllm_kd.model.llm import checkpoint_decoder_layers

D, FF, LAYERS = 32, 48, 2
ARCH = {
    "llama": {"model_type": "llama", "num_key_value_heads": 2},
    "qwen2": {"model_type": "qwen2", "num_key_value_heads": 1},
}


def _llm(arch: str, dtype=torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(ARCH[arch])
    cfg = AutoConfig.for_model(
        kw.pop("model_type"),
        hidden_size=D,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        vocab_size=64,
        max_position_embeddings=32,
        **kw,
    )
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(dtype).train()
    for p in llm.parameters():  # norms start at ones: make their weight gradients matter
        if p.dim() == 1:
            nn.init.normal_(p, 1.0, 0.2)
    return llm


def _ids():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def _loss_and_grads(llm, ids):
    llm.zero_grad(set_to_none=True)
    loss = llm(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in llm.named_parameters()}


class _SavedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Bytes of the distinct storages saved for the backward pass, ``model``'s parameters left out."""

    def __init__(self, model: nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}
        super().__init__(self._pack, lambda t: t)

    def _pack(self, t):
        if t.untyped_storage().data_ptr() not in self.params:
            self.storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


class _TextbookRMSNorm(nn.Module):
    """transformers' RMSNorm without its float32 round trip (which at float64 rounds the reference itself)."""

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def test_functions_match_autograd_at_float64():
    """Each Function against finite differences (gradcheck) and against plain autograd of its formula, 1e-10."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)
    wg, wu = (torch.randn(12, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    wd = torch.randn(8, 12, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-6), (x, w))
    assert torch.autograd.gradcheck(SwiGLUFunction.apply, (x, wg, wu, wd))
    cases = [
        (
            lambda: RMSNormFunction.apply(x, w, 1e-6),
            lambda: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)),
            (x, w),
        ),
        (
            lambda: SwiGLUFunction.apply(x, wg, wu, wd),
            lambda: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd),
            (x, wg, wu, wd),
        ),
    ]
    for lean, ref, inputs in cases:
        dy = torch.randn(2, 3, 8, dtype=torch.float64, generator=g)
        got, want = lean(), ref()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for a, b in zip(
            torch.autograd.grad(got, inputs, dy), torch.autograd.grad(want, inputs, dy), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lean_llm_float64_equals_autograd(arch):
    """Loss and every parameter gradient at float64 to 1e-10 relative, the reference's norms being the same
    formula in plain autograd (transformers' own round trip through float32 would round the reference)."""
    ref = _llm(arch, torch.float64)
    for m in ref.modules():
        if hasattr(m, "variance_epsilon"):
            m.__class__ = type("TextbookRMSNorm", (_TextbookRMSNorm,), {})
    lean = copy.deepcopy(ref)
    assert lean_decoder_ops(lean) == 2 * LAYERS + 1 + LAYERS  # 2 norms + MLP a layer, the final norm
    ids = _ids()
    ref_loss, ref_grads = _loss_and_grads(ref, ids)
    loss, grads = _loss_and_grads(lean, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-10, atol=1e-13, msg=k)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lean_llm_same_loss_gradients_state_dict_fewer_saved_bytes(arch, monkeypatch):
    """Against the unpatched transformers modules at float32: loss and every parameter gradient to 1e-5,
    the state dict unchanged, idempotent, and exactly the tensors removed missing from what is saved."""
    ref = _llm(arch)
    lean = copy.deepcopy(ref)
    before = _SavedActivations(ref)
    with before:
        ref.model(input_ids=_ids())
    n = lean_decoder_ops(lean)
    assert n == 3 * LAYERS + 1 and lean_decoder_ops(lean) == n  # idempotent
    mlp = lean.model.layers[0].mlp
    assert type(mlp).__name__.startswith("Lean") and type(mlp).__mro__[1] is type(ref.model.layers[0].mlp)
    sd, ref_sd = lean.state_dict(), ref.state_dict()
    assert list(sd) == list(ref_sd) and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    ids = _ids()
    ref_loss, ref_grads = _loss_and_grads(ref, ids)
    loss, grads = _loss_and_grads(lean, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert set(grads) == set(ref_grads)
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-7, msg=k)
    after = _SavedActivations(lean)
    with after:
        lean.model(input_ids=_ids())
    tokens = ids.numel()
    # per layer: the two norms' normalised x (d floats a token), the MLP's silu(gate) and silu(gate) * up
    # (I each); and the final norm's normalised x. Everything else the layers keep is kept as before.
    removed = (LAYERS * (2 * D + 2 * FF) + D) * tokens * 4
    assert before.bytes - after.bytes == removed, (before.bytes, after.bytes)
    evaluating = _SavedActivations(lean)

    def not_without_grad(*args):
        raise AssertionError("a lean Function ran without gradients")

    monkeypatch.setattr(RMSNormFunction, "apply", not_without_grad)
    monkeypatch.setattr(SwiGLUFunction, "apply", not_without_grad)
    with torch.no_grad(), evaluating:  # evaluation / generation: the original forwards
        out, ref_out = lean.model(input_ids=ids), ref.model(input_ids=ids)
    assert torch.equal(out.last_hidden_state, ref_out.last_hidden_state) and evaluating.bytes == 0


def test_lean_composes_with_gradient_checkpointing():
    """A student's step (fused loss, teacher) with lean ops and checkpointed layers equals the plain one."""
    student = _tiny_student(layers=2).train()
    teacher = _tiny_student(tie=False, layers=1).eval().requires_grad_(False)

    def both(s):
        lean_decoder_ops(s.llm)
        return checkpoint_decoder_layers(s.llm)

    _assert_same_step(student, teacher, _batch(student.num_visual_tokens), both)
    layer = student.llm.get_decoder().layers[0]
    assert type(layer).__name__.startswith("Checkpointed") and type(layer.mlp).__name__.startswith("Lean")


def test_lora_linears_keep_their_forward():
    """Adapters on the MLP's linears: that MLP is not swapped (the norms are), and one swapped before the
    adapters were attached runs its original forward: the same step as without lean ops, adapters included."""
    pytest.importorskip("peft")
    from mllm_kd.config import LoraConfig, StageConfig, TrainableConfig
    from mllm_kd.lora import attach
    from mllm_kd.model.multimodal import apply_trainable

    cfg = StageConfig(
        trainable=TrainableConfig(vision="frozen", llm="lora"),
        lora=LoraConfig(r=4, dropout=0, target_modules=["gate_proj", "up_proj", "down_proj"]),
    )
    teacher = _tiny_student(tie=False, layers=1).eval().requires_grad_(False)

    def lora_student(swap_first: bool):
        student = _tiny_student(layers=2).train()
        if swap_first:
            assert lean_decoder_ops(student.llm) == 3 * 2 + 1
        assert attach(student, cfg) > 0
        apply_trainable(student, cfg.trainable)
        torch.manual_seed(1)
        for name, p in student.named_parameters():  # the adapters start at zero: make them matter
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        return student

    counted = []

    def swap(s):
        counted.append(lean_decoder_ops(s.llm))
        return 2

    student = lora_student(swap_first=False)
    _assert_same_step(student, teacher, _batch(student.num_visual_tokens), swap)
    assert counted == [5]  # the two layers' four norms and the final one; no MLP
    assert not type(student.llm.get_decoder().layers[0].mlp).__name__.startswith("Lean")
    plain, swapped = lora_student(swap_first=False), lora_student(swap_first=True)
    assert type(swapped.llm.get_decoder().layers[0].mlp).__name__.startswith("Lean")
    batch = _batch(plain.num_visual_tokens)
    ref_total, ref_grads = _step_loss_and_grads(plain, teacher, batch)
    total, grads = _step_loss_and_grads(swapped, teacher, batch)
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-6)
    assert set(grads) == set(ref_grads) and any("lora_B" in k for k in grads)
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-7, msg=k)


class _OffsetNorm(nn.Module):
    """A norm shaped like an RMSNorm that computes something else ((1 + w) scaling, as Gemma's)."""

    def __init__(self, d):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.zeros(d)), 1e-6

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class _MLP(nn.Module):
    def __init__(self, act: nn.Module, bias: bool = False):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(8, 12, bias=bias), nn.Linear(8, 12, bias=bias)
        self.down_proj, self.act_fn = nn.Linear(12, 8, bias=bias), act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_only_recognised_modules_are_swapped():
    """Other maths behind the same attributes, other activations, biased linears: left as they are."""
    model = nn.ModuleDict(
        {
            "offset_norm": _OffsetNorm(8),
            "gelu": _MLP(nn.GELU()),
            "biased": _MLP(nn.SiLU(), bias=True),
            "silu": _MLP(nn.SiLU()),
        }
    )
    assert lean_decoder_ops(model) == 1
    assert [k for k, m in model.items() if type(m).__name__.startswith("Lean")] == ["silu"]


def test_bf16_autocast_casts_like_the_linears():
    """Under CPU bf16 autocast: the MLP runs (and returns) bf16 like F.linear, the norm float32 like
    transformers'; outputs and gradients within bf16 rounding of the unpatched model's."""
    ref = _llm("qwen2")
    lean = copy.deepcopy(ref)
    lean_decoder_ops(lean)
    x = torch.randn(2, 12, D, generator=torch.Generator().manual_seed(0))
    outs = []
    for m in (ref, lean):
        layer = m.model.layers[0]
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            normed = layer.post_attention_layernorm(xi)
            out = layer.mlp(normed)
        out.float().square().mean().backward()
        outs.append(
            (
                normed,
                out,
                xi.grad,
                layer.mlp.gate_proj.weight.grad,
                layer.post_attention_layernorm.weight.grad,
            )
        )
    for a, b in zip(*outs, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-3)
    assert outs[1][0].dtype == torch.float32 and outs[1][1].dtype == torch.bfloat16


def test_lean_activations_must_be_a_bool():
    with pytest.raises(ConfigError, match=r"train\.lean_activations must be true or false, got 1"):
        TrainConfig(lean_activations=1)


def test_stage_with_lean_activations_trains_like_without(smoke_teacher, tmp_path, monkeypatch):
    """Stage 1 with its LLM trained: the default (train.lean_activations=true) gives every step's loss and
    the final weights of the run with transformers' own forwards (false)."""
    from conftest import SMOKE
    from safetensors.torch import load_file

    import mllm_kd.train.trainer as trainer
    from mllm_kd.cli import stage_config
    from mllm_kd.stages import STAGES

    common = [*stage1_llm_overrides(smoke_teacher), "train.max_steps=3"]
    swapped = []
    monkeypatch.setattr(trainer, "lean_decoder_ops", lambda llm: swapped.append(lean_decoder_ops(llm)) or 0)
    runs = {}
    for lean in (True, False):
        cfg = stage_config(
            SMOKE, "stage1", [f"run_dir={tmp_path / str(lean)}", *common, f"train.lean_activations={lean}"]
        )
        assert cfg.train.lean_activations is lean
        losses: dict[int, float] = {}
        final = STAGES["stage1"].run(
            cfg, on_step=lambda s, m, losses=losses: losses.__setitem__(s, m["loss"])
        )
        runs[lean] = losses, load_file(final / "model.safetensors")
    assert swapped == [4]  # the smoke student's one layer (two norms, the MLP) and the final norm
    (got, wa), (ref, wb) = runs[True], runs[False]
    assert sorted(got) == sorted(ref) == [1, 2, 3]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6, msg=k)
