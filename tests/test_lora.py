"""LoRA / QLoRA students (trainable.llm: lora): trainable counts, family defaults, distillation gradients on the
fused path, a stage 3 whose loss falls, exact resume, and merged checkpoints / exports equal to the adapters."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMOKE
from safetensors.torch import load_file

from mllm_kd.checkpoint.native import load_checkpoint_model
from mllm_kd.cli import stage_config
from mllm_kd.errors import ConfigError
from mllm_kd.lora import FAMILY_TARGETS, LoraConfig, attach, lora_layers, resume_weights, target_modules
from mllm_kd.model.multimodal import apply_trainable
from mllm_kd.train.objective import LossComputer, fusable_head

pytest.importorskip("peft")


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def sft_run(smoke_teacher, tmp_path_factory):
    """Student stages 1 and 2 of the smoke recipe (a few steps): what a LoRA stage 3 starts from."""
    from mllm_kd.stages import STAGES

    run = tmp_path_factory.mktemp("lora_run")
    for stage in ("stage1", "stage2"):
        STAGES[stage].run(stage_config(SMOKE, stage, _common(run, smoke_teacher, "train.max_steps=4")))
    return run, smoke_teacher


def _common(run, teacher, *more):
    return [
        f"run_dir={run}",
        f"data_dir={teacher}/data",
        f"teacher.checkpoint={teacher}/teacher_sft",
        f"model.vision.checkpoint={teacher}/teacher_sft",
        "train.batch_size=2",
        *more,
    ]


def _lora_cfg(run, teacher, *more):
    return stage_config(
        SMOKE, "stage3", _common(run, teacher, "trainable.llm=lora", "lora.r=4", "lora.dropout=0", *more)
    )


def _student(run, cfg):
    model, tok, _ = load_checkpoint_model(run / "stage2")
    attach(model, cfg)
    return model, tok


def test_trainable_counts_are_the_adapters(sft_run):
    run, teacher = sft_run
    cfg = _lora_cfg(run, teacher)
    model, _ = _student(run, cfg)
    counts = apply_trainable(model, cfg.trainable)
    layers = lora_layers(model)
    assert sorted({n.rsplit(".", 1)[-1] for n in layers}) == sorted(FAMILY_TARGETS["qwen2"])
    # r x (in + out) per adapted layer, from the base layers' shapes
    expected = sum(
        4 * (m.get_base_layer().in_features + m.get_base_layer().out_features) for m in layers.values()
    )
    assert (
        counts["llm"] == expected == 2048
    )  # 1 layer: q 32->32, k/v 32->16, o 32->32, gate/up 32->64, down 64->32
    assert (
        counts["projector"] == sum(p.numel() for p in model.projector.parameters()) and counts["vision"] == 0
    )
    trainable = {n for n, p in model.llm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


@pytest.mark.parametrize("family", sorted(FAMILY_TARGETS))
def test_family_defaults_name_linear_layers(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    small = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": 64,
        "head_dim": 16,
    }
    if family == "phi3":
        small["pad_token_id"] = 0  # its default (32000) lies outside the small vocabulary
    if family == "opt":
        small = {
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 64,
            "word_embed_proj_dim": 32,
        }
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **small))
    assert target_modules(llm, LoraConfig()) == FAMILY_TARGETS[family]


def test_bad_lora_settings_name_the_key(sft_run):
    run, teacher = sft_run
    model, _, _ = load_checkpoint_model(run / "stage2")
    with pytest.raises(ConfigError, match=r"lora.target_modules: \['qproj'\] are not linear layers"):
        target_modules(model.llm, LoraConfig(target_modules=["qproj"]))
    from transformers import AutoConfig, AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    )
    with pytest.raises(ConfigError, match=r"no default for LLM family .gpt2.*c_attn"):
        target_modules(gpt2, LoraConfig())
    for bad, match in (("lora.r=0", "lora.r must be"), ("lora.quantize=8bit", "lora.quantize must be 4bit")):
        with pytest.raises(ConfigError, match=match):
            _lora_cfg(run, teacher, bad)
    with pytest.raises(ConfigError, match=r"trainable\.projector must be one of"):
        _lora_cfg(run, teacher, "trainable.projector=lora")


def test_distillation_gradients_reach_the_adapters_on_the_fused_path(sft_run):
    """MDist + RDist only (w_ce=0): the fused path (head weight as a plain nn.Linear) gives the adapters the
    reference path's gradients, and the frozen head none."""
    from mllm_kd.data.datasets import Collator, build_train_data
    from mllm_kd.data.encoding import ImageProcessor

    run, teacher = sft_run
    grads = {}
    for fused in (True, False):
        cfg = _lora_cfg(run, teacher, "loss.w_ce=0", f"loss.fused={fused}")
        torch.manual_seed(0)
        model, tok = _student(run, cfg)
        apply_trainable(model, cfg.trainable)
        for m in lora_layers(model).values():  # B = 0 at init: move away so that A gets gradients too
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.1)
        assert fusable_head(model) is model.llm.get_output_embeddings()
        t_model, _, _ = load_checkpoint_model(teacher / "teacher_sft")
        images = ImageProcessor(
            model.vision.image_size, cfg.model.vision.image_mean, cfg.model.vision.image_std
        )
        data = build_train_data(cfg.data, tok, model.num_visual_tokens, model.image_token_id, images, seed=0)
        batch = Collator(tok.pad_token_id)([data.dataset[i] for i in range(4)])
        total, terms = LossComputer(cfg, t_model.eval().requires_grad_(False))(model, batch)
        assert terms["rdist"] > 0 and terms["mdist_vis"] > 0
        total.backward()
        assert model.llm.get_output_embeddings().weight.grad is None
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(g.abs().sum() > 0 for n, g in grads[fused].items() if ".lora_" in n)
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=1e-4, atol=1e-6)


def test_lora_stage3_loss_falls_and_export_merges(sft_run, tmp_path):
    from mllm_kd.export import main as export_main
    from mllm_kd.stages import STAGES

    run, teacher = sft_run
    cfg = _lora_cfg(run, teacher, "train.epochs=3", "optim.lr=1e-2", "optim.warmup_ratio=0")
    final = STAGES["stage3"].run(cfg)
    losses = [json.loads(ln)["loss"] for ln in (run / "stage3/metrics.jsonl").read_text().splitlines()]
    state = json.loads((final / "trainer_state.json").read_text())
    assert len(losses) == state["total_steps"] == 27  # 3 epochs of 18 questions, 2 a step
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    assert (final / "adapter/adapter_config.json").is_file()
    adapter = json.loads((final / "adapter/adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["peft_type"] == "LORA" and "q_proj" in adapter["target_modules"]

    # the stage-2 model + the adapters (unmerged; projector from stage 3) = the merged checkpoint = the export
    unmerged, _ = _student(run, cfg)
    resume_weights(unmerged, final, "cpu")
    merged, _, _ = load_checkpoint_model(run / "stage3")
    assert not lora_layers(merged)
    assert export_main(["--checkpoint", str(run / "stage3"), "--out", str(tmp_path / "hf")]) == 0
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    n = unmerged.num_visual_tokens
    ids = torch.tensor([[5, 6] + [unmerged.image_token_id] * n + [7, 8, 9]])
    pixels = torch.randn(1, 3, unmerged.vision.image_size, unmerged.vision.image_size)
    attn = torch.ones_like(ids)
    with torch.no_grad():
        ref = unmerged.eval()(ids, attn, pixels).logits
        delta = (ref - load_checkpoint_model(run / "stage2")[0].eval()(ids, attn, pixels).logits).abs().max()
        assert delta > 1e-3  # the adapters changed the model, so the comparisons below mean something
        torch.testing.assert_close(merged.eval()(ids, attn, pixels).logits, ref, rtol=1e-5, atol=1e-5)
        hf_logits = hf(input_ids=ids, attention_mask=attn, pixel_values=pixels).logits
        torch.testing.assert_close(hf_logits, ref, rtol=1e-5, atol=1e-5)
    assert "- lora" in (tmp_path / "hf/README.md").read_text()


def test_lora_resume_is_exact(sft_run, tmp_path):
    from mllm_kd.stages import STAGES

    run, teacher = sft_run
    more = ("train.max_steps=6", "train.save_every=2", f"init_from={run}/stage2")
    full_losses, resumed = {}, {}
    full = STAGES["stage3"].run(
        _lora_cfg(tmp_path / "a", teacher, *more), on_step=lambda s, m: full_losses.__setitem__(s, m["loss"])
    )

    def stop_at_5(step, metrics):
        if step == 5:
            raise Interrupt

    cfg_b = _lora_cfg(tmp_path / "b", teacher, *more)
    with pytest.raises(Interrupt):
        STAGES["stage3"].run(cfg_b, on_step=stop_at_5)
    assert (tmp_path / "b/stage3/checkpoints/step-0000004/adapter/adapter_model.safetensors").is_file()
    final = STAGES["stage3"].run(cfg_b, on_step=lambda s, m: resumed.__setitem__(s, m["loss"]))
    assert sorted(resumed) == [5, 6]
    for step in (5, 6):
        assert resumed[step] == pytest.approx(full_losses[step], rel=1e-6)
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        wa, wb = load_file(full / name), load_file(final / name)
        assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa), name


def test_qlora_4bit_base_trains_and_merges(sft_run, tmp_path):
    pytest.importorskip("bitsandbytes")
    from mllm_kd.stages import STAGES

    run, teacher = sft_run
    cfg = _lora_cfg(tmp_path, teacher, "lora.quantize=4bit", "train.max_steps=3", f"init_from={run}/stage2")
    final = STAGES["stage3"].run(cfg)
    sd = load_file(final / "model.safetensors")
    q = "llm.model.layers.0.self_attn.q_proj.weight"
    assert sd[q].dtype == torch.float32 and sd[q].shape == (32, 32)  # dequantised + merged, ordinary names
    assert not [k for k in sd if "absmax" in k or "lora_" in k or "base_layer" in k]
    # the merged float model computes what the 4-bit base + adapters computed
    qlora, _ = _student(run, cfg)
    resume_weights(qlora, final, "cpu")
    merged, _, _ = load_checkpoint_model(final)
    n = merged.num_visual_tokens
    ids = torch.tensor([[5] + [merged.image_token_id] * n + [7, 8]])
    pixels = torch.randn(1, 3, merged.vision.image_size, merged.vision.image_size)
    with torch.no_grad():
        # train mode (dropout is 0): bitsandbytes 0.50's CPU inference path of a 4-bit layer (eval + no_grad)
        # fails with "shape '[32, 0]' is invalid"; training runs the other path
        a = qlora.train()(ids, torch.ones_like(ids), pixels).logits
        b = merged.eval()(ids, torch.ones_like(ids), pixels).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
