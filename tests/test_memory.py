"""The training step's memory: one gradient buffer for a tied embedding / head, activation checkpointing.
Each saving is checked to leave the loss and the gradients as they were."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import SMOKE, TINY_CLIP
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import mllm_kd.model.multimodal as multimodal
from mllm_kd.config import LLMConfig, LossConfig, ModelConfig, ProjectorConfig, StageConfig, VisionConfig
from mllm_kd.model.llm import checkpoint_decoder_layers
from mllm_kd.model.multimodal import build_model
from mllm_kd.model.tied import tied_embedding, tied_lookup
from mllm_kd.train.objective import LossComputer

VOCAB, IMG_ID = 200, 199


class _NewTensorsOfShape(TorchDispatchMode):
    """Counts the operator outputs of ``shape`` that own fresh storage (not views of, or in place on, an input)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.made = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        fresh = isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in ins
        if fresh and tuple(out.shape) == self.shape:
            self.made.append(func.__name__)
        return out


def test_tied_lookup_equals_embedding_and_head():
    """Values and the weight's gradient as nn.Embedding + a linear head on the same weight, padding row
    included (no gradient from the lookup), with and without the head using the weight."""
    torch.manual_seed(0)
    emb = nn.Embedding(50, 8, padding_idx=3)
    ids = torch.tensor([[3, 1, 4, 1], [5, 9, 3, 6]])
    h = torch.randn(2, 4, 8)
    for use_head in (True, False):
        emb.zero_grad(set_to_none=True)
        e = emb(ids)
        ref = e.square().sum() + (F.linear(h, emb.weight).logsumexp(-1).sum() if use_head else 0)
        ref.backward()
        ref_grad = emb.weight.grad.clone()
        emb.zero_grad(set_to_none=True)
        e2, w = tied_lookup(emb, ids)
        torch.testing.assert_close(e2, e.detach())
        got = e2.square().sum() + (F.linear(h, w).logsumexp(-1).sum() if use_head else 0)
        got.backward()
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(emb.weight.grad, ref_grad)
        assert emb.weight.grad[3].abs().sum() == (ref_grad[3].abs().sum())  # padding row: head's share only


def _tiny_student(tie: bool = True, layers: int = 1):
    llm = {
        "model_type": "qwen2",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 64,
        "tie_word_embeddings": tie,
    }
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=VisionConfig(config=dict(TINY_CLIP)), projector=ProjectorConfig(), llm=LLMConfig(config=llm)
    )
    model = build_model(cfg, image_token_id=IMG_ID, vocab_size=VOCAB)
    model.vision.requires_grad_(False)
    return model


def _batch(n_vis: int):
    g = torch.Generator().manual_seed(0)
    T = n_vis + 10
    ids = torch.randint(0, IMG_ID, (2, T), generator=g)
    ids[:, 1 : 1 + n_vis] = IMG_ID
    labels = torch.full((2, T), -100)
    labels[:, T - 4 :] = ids[:, T - 4 :]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones(2, T, dtype=torch.long),
        "pixel_values": torch.randn(2, 3, 32, 32, generator=g),
        "labels": labels,
    }


def _step(student, teacher, batch, fused: bool):
    """Loss, gradients and the head-sized tensors the backward pass allocated."""
    student.zero_grad(set_to_none=True)
    loss_fn = LossComputer(StageConfig(loss=LossConfig(fused=fused, chunk_size=16)), teacher)
    total, _ = loss_fn(student, batch)
    with _NewTensorsOfShape((VOCAB, 32)) as made:
        total.backward()
    grads = {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}
    return total.detach(), grads, made.made


@pytest.mark.parametrize("fused", [True, False])
def test_tied_student_one_head_buffer_same_loss_and_gradients(fused, monkeypatch):
    """A tied student's step: the same loss and gradients as plain autograd; the fused path's backward
    allocates no head-sized tensor (plain autograd: the embedding's dense gradient and the sum of the two)."""
    student = _tiny_student()
    teacher = _tiny_student(tie=False).eval().requires_grad_(False)
    assert tied_embedding(student.llm) is student.llm.get_input_embeddings()
    assert tied_embedding(teacher.llm) is None  # untied (and frozen)
    batch = _batch(student.num_visual_tokens)
    total, grads, made = _step(student, teacher, batch, fused)
    monkeypatch.setattr(multimodal, "tied_embedding", lambda llm: None)
    ref_total, ref_grads, ref_made = _step(student, teacher, batch, fused)
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-6)
    assert set(grads) == set(ref_grads) and "llm.model.embed_tokens.weight" in grads
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-7, msg=k)
    assert "embedding_dense_backward.default" in ref_made and len(ref_made) >= len(made) + 2
    if fused:
        assert made == []


def test_tied_lookup_only_for_a_trained_tied_embedding():
    student = _tiny_student()
    embed = student.llm.get_input_embeddings()
    embed.weight.requires_grad_(False)
    assert tied_embedding(student.llm) is None  # frozen: nothing to save
    embed.weight.requires_grad_(True)
    handle = embed.register_forward_hook(lambda *a: None)
    assert tied_embedding(student.llm) is None  # a hook expects the module to run
    handle.remove()
    batch = _batch(student.num_visual_tokens)
    with torch.no_grad():
        out = student(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    assert out.head_weight is None  # no gradients, no alias
    out = student(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    assert out.head_weight is not None and out.head_weight.data_ptr() == embed.weight.data_ptr()


# ------------------------------------------------------------------------------ activation checkpointing
def _loss_and_grads(student, teacher, batch):
    student.zero_grad(set_to_none=True)
    total, _ = LossComputer(StageConfig(loss=LossConfig(chunk_size=16)), teacher)(student, batch)
    total.backward()
    return total.detach(), {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}


def _assert_same_step(student, teacher, batch, prepare):
    """The loss and gradients of ``student`` before and after ``prepare(student)`` (checkpointing, ...)."""
    ref_total, ref_grads = _loss_and_grads(student, teacher, batch)
    keys = list(student.state_dict())
    assert prepare(student) == 2
    assert list(student.state_dict()) == keys  # checkpoints and resumes see the same weights
    total, grads = _loss_and_grads(student, teacher, batch)
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-6)
    assert set(grads) == set(ref_grads)
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-7, msg=k)


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Bytes saved for the backward pass while active (what activation checkpointing removes)."""

    def __init__(self):
        self.bytes = 0
        super().__init__(self._pack, lambda t: t)

    def _pack(self, t):
        self.bytes += t.numel() * t.element_size()
        return t


def test_gradient_checkpointing_same_loss_and_gradients_fewer_saved_tensors():
    student = _tiny_student(layers=2).train()
    teacher = _tiny_student(tie=False, layers=1).eval().requires_grad_(False)
    batch = _batch(student.num_visual_tokens)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    before = _SavedBytes()
    with before:
        student(*args, return_logits=False)
    _assert_same_step(student, teacher, batch, lambda s: checkpoint_decoder_layers(s.llm))
    assert type(student.llm.get_decoder().layers[0]).__name__.startswith("Checkpointed")
    assert checkpoint_decoder_layers(student.llm) == 2  # idempotent: no checkpoint inside a checkpoint
    assert type(student.llm.get_decoder().layers[0]).__mro__[1].__name__ == "Qwen2DecoderLayer"
    after = _SavedBytes()
    with after:
        student(*args, return_logits=False)
    assert after.bytes < before.bytes / 2
    student.eval()  # evaluation and generation run the layers as they are
    evaluating = _SavedBytes()
    with evaluating:
        student(*args, return_logits=False)
    assert evaluating.bytes == before.bytes


def test_gradient_checkpointing_composes_with_lora():
    pytest.importorskip("peft")
    from mllm_kd.config import LoraConfig, TrainableConfig
    from mllm_kd.lora import attach
    from mllm_kd.model.multimodal import apply_trainable

    student = _tiny_student(layers=2).train()
    cfg = StageConfig(trainable=TrainableConfig(vision="frozen", llm="lora"), lora=LoraConfig(r=4, dropout=0))
    assert attach(student, cfg) > 0
    apply_trainable(student, cfg.trainable)
    for name, p in student.named_parameters():  # the adapters start at zero: make them matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    teacher = _tiny_student(tie=False, layers=1).eval().requires_grad_(False)
    _assert_same_step(
        student, teacher, _batch(student.num_visual_tokens), lambda s: checkpoint_decoder_layers(s.llm)
    )


@pytest.mark.slow  # compiling forward and backward: about 40 s on 2 shared cores
@pytest.mark.parametrize("transform", ["checkpointing", "lean_activations"])
def test_layer_transforms_compose_with_compile(transform):
    """Checkpointing or the lean RMSNorm / MLP first, then torch.compile of each layer (the trainer's
    order): the same step."""
    from mllm_kd.model.lean import lean_decoder_ops
    from mllm_kd.model.llm import compile_decoder_layers

    first = {"checkpointing": checkpoint_decoder_layers, "lean_activations": lean_decoder_ops}[transform]
    student = _tiny_student(layers=2).train()
    teacher = _tiny_student(tie=False, layers=1).eval().requires_grad_(False)
    torch._dynamo.reset()

    def both(s):
        first(s.llm)
        return compile_decoder_layers(s.llm)

    _assert_same_step(student, teacher, _batch(student.num_visual_tokens), both)


def stage1_llm_overrides(smoke_teacher) -> list[str]:
    """Stage 1 of the smoke config on the session's smoke teacher, with the student's LLM trained."""
    return [
        f"data_dir={smoke_teacher}/data",
        f"teacher.checkpoint={smoke_teacher}/teacher_sft",
        f"model.vision.checkpoint={smoke_teacher}/teacher_sft",
        f"model.tokenizer={smoke_teacher}/data/tokenizer",
        "trainable.llm=full",
        "train.batch_size=2",
    ]


def test_stage_with_gradient_checkpointing_trains_and_resumes_like_without(
    smoke_teacher, tmp_path, monkeypatch
):
    """Stage 1 with its LLM trained: activation checkpointing (``train.gradient_checkpointing`` left at null,
    which turns it on for a CPU) gives every step's loss and the final weights of the run with it set to
    false, also when stopped after step 3 and resumed from step 2's checkpoint."""
    from safetensors.torch import load_file

    from mllm_kd.cli import stage_config
    from mllm_kd.stages import STAGES

    common = [*stage1_llm_overrides(smoke_teacher), "train.max_steps=4", "train.save_every=2"]

    def cfg(run, *more):
        return stage_config(SMOKE, "stage1", [f"run_dir={run}", *common, *more])

    ref: dict[int, float] = {}
    import mllm_kd.train.trainer as trainer

    checkpointed = []
    monkeypatch.setattr(
        trainer, "checkpoint_decoder_layers", lambda llm: checkpointed.append(checkpoint_decoder_layers(llm))
    )
    ref_final = STAGES["stage1"].run(
        cfg(tmp_path / "a", "train.gradient_checkpointing=false"),
        on_step=lambda s, m: ref.__setitem__(s, m["loss"]),
    )
    assert checkpointed == []

    class Stop(Exception):
        pass

    def stop_after_3(step, metrics):
        if step == 3:
            raise Stop

    ckpt_cfg = cfg(tmp_path / "b")
    assert ckpt_cfg.train.gradient_checkpointing is None
    with pytest.raises(Stop):
        STAGES["stage1"].run(ckpt_cfg, on_step=stop_after_3)
    got: dict[int, float] = {}
    final = STAGES["stage1"].run(ckpt_cfg, on_step=lambda s, m: got.__setitem__(s, m["loss"]))
    assert sorted(got) == [3, 4] and checkpointed == [1, 1]  # the smoke student's one layer, in both runs
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step
    wa, wb = load_file(ref_final / "model.safetensors"), load_file(final / "model.safetensors")
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6, msg=k)


def test_gradient_checkpointing_must_be_a_bool_or_null():
    from mllm_kd.config import TrainConfig
    from mllm_kd.errors import ConfigError

    with pytest.raises(
        ConfigError,
        match=r"train\.gradient_checkpointing must be true, false or null \(on a CPU, off on a GPU\), got 'yes'",
    ):
        TrainConfig(gradient_checkpointing="yes")


@pytest.mark.parametrize(
    ("option", "device", "expected"),
    [
        (None, "cpu", True),
        (None, "cuda", False),
        (False, "cpu", False),
        (True, "cuda", True),
        (True, "cpu", True),
    ],
)
def test_gradient_checkpointing_null_means_on_for_a_cpu_off_for_a_gpu(option, device, expected):
    from mllm_kd.config import TrainConfig
    from mllm_kd.runtime.plan import checkpoint_layers, plan_run

    assert checkpoint_layers(option, torch.device(device)) is expected
    if device == "cpu":  # the plan a stage gets (no GPU needed to build it)
        cfg = StageConfig(train=TrainConfig(device="cpu", gradient_checkpointing=option))
        assert plan_run(cfg, distill=False).checkpoint_layers is expected


def test_tied_lookup_with_an_expanded_head_gradient():
    """A head gradient autograd hands over as an expanded tensor (the weight summed) is copied, not written."""
    emb = nn.Embedding(10, 4)
    ids = torch.tensor([1, 1, 3])
    e, w = tied_lookup(emb, ids)
    (e.sum() + w.sum()).backward()
    expected = torch.ones(10, 4)
    expected[1] += 2
    expected[3] += 1
    torch.testing.assert_close(emb.weight.grad, expected)
