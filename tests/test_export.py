"""Hugging Face LLaVA interoperability: export (transformers loads it alone and generates the same tokens)
and import (an HF LLaVA directory as teacher, init_from, or vision source, with identical logits)."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from conftest import SMOKE
from PIL import Image

from mllm_kd.checkpoint.hf_llava import build_hf_llava, export_hf_llava, is_hf_llava_dir
from mllm_kd.checkpoint.native import build_from_config, load_checkpoint_model, save_checkpoint
from mllm_kd.cli import main as stage_main
from mllm_kd.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from mllm_kd.errors import ConfigError
from mllm_kd.export import main as export_main
from mllm_kd.model.generate import Generator
from mllm_kd.model.tokenization import image_token_id, load_tokenizer, train_bpe_tokenizer

CLIP = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}
SIGLIP = {**CLIP, "model_type": "siglip_vision_model"}
LLM = {
    "hidden_size": 48,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
OPEN_CLIP = {"layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 32}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    texts = ["a red circle", "a blue square", "what shape is it?", "user assistant system"] * 4
    return load_tokenizer(train_bpe_tokenizer(texts, d / "tokenizer", vocab_size=300))


def _cfg(vision="clip", llm="qwen2", projector="mlp2x_gelu", **kw) -> ModelConfig:
    vcfg = (
        VisionConfig(backend="open_clip", config=dict(OPEN_CLIP))
        if vision == "open_clip"
        else VisionConfig(backend="hf", config=dict(CLIP if vision == "clip" else SIGLIP))
    )
    for k in ("feature_layer", "drop_cls"):
        if k in kw:
            setattr(vcfg, k, kw.pop(k))
    vcfg.image_mean, vcfg.image_std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    return ModelConfig(
        vision=vcfg,
        projector=ProjectorConfig(type=projector),
        llm=LLMConfig(config={"model_type": llm, **LLM, **kw.pop("llm_extra", {})}, **kw),
    )


def _model(cfg: ModelConfig, tokenizer, seed=0):
    torch.manual_seed(seed)
    model = build_from_config(cfg, tokenizer).eval()
    with torch.no_grad():  # away from the init so that only copied weights reproduce it
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs(model, tokenizer, seed=0):
    g = torch.Generator().manual_seed(seed)
    img, n = image_token_id(tokenizer), model.num_visual_tokens
    text = lambda k: torch.randint(img + 1, len(tokenizer), (2, k), generator=g)  # noqa: E731
    ids = torch.cat([text(3), torch.full((2, n), img), text(6)], dim=1)
    return ids, torch.ones_like(ids), torch.randn(2, 3, 32, 32, generator=g)


@pytest.mark.parametrize(
    ("vision", "llm", "kw"),
    [
        ("clip", "qwen2", {"feature_layer": -2, "drop_cls": True}),
        (
            "clip",
            "llama",
            {"feature_layer": 1, "drop_cls": False, "llm_extra": {"tie_word_embeddings": True}},
        ),
        ("siglip", "qwen2", {"feature_layer": 0, "drop_cls": True, "keep_layers": [0, 2]}),
    ],
)
def test_export_then_import_gives_identical_logits(tmp_path, tokenizer, vision, llm, kw):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = _model(_cfg(vision, llm, **kw), tokenizer)
    cfg = _cfg(vision, llm, **kw)
    ids, mask, px = _inputs(model, tokenizer)
    with torch.no_grad():
        want = model(ids, mask, px).logits
    out = export_hf_llava(model, tokenizer, cfg, tmp_path / "hf")
    assert is_hf_llava_dir(out) and not is_hf_llava_dir(tmp_path)

    # transformers alone: same logits, and the processor writes as many <image> ids as we do
    hf = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    assert hf.config.image_seq_length == model.num_visual_tokens
    with torch.no_grad():
        got = hf(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    proc = AutoProcessor.from_pretrained(str(out))
    enc = proc(images=Image.new("RGB", (32, 32)), text="<image>hi", return_tensors="pt")
    assert int((enc["input_ids"] == image_token_id(tokenizer)).sum()) == model.num_visual_tokens

    # back into mllm_kd: identical logits, and it saves/reloads as an ordinary mllm_kd checkpoint
    torch.manual_seed(123)
    back, tok2, cfg2 = load_checkpoint_model(out)
    assert tok2.get_vocab() == tokenizer.get_vocab()
    n_hidden = CLIP["num_hidden_layers"] + 1  # hidden_states: the embeddings + one per layer
    assert cfg2.vision.feature_layer % n_hidden == cfg.vision.feature_layer % n_hidden
    assert cfg2.vision.drop_cls == cfg.vision.drop_cls
    assert cfg2.vision.image_mean == cfg.vision.image_mean and cfg2.projector.type == "mlp2x_gelu"
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask, px).logits, want, rtol=0, atol=0)
    ckpt = save_checkpoint(tmp_path / "ckpt", back, cfg2, tok2, None, {"step": 0})
    again, _, _ = load_checkpoint_model(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(ids, mask, px).logits, want, rtol=0, atol=0)


def test_import_reads_both_llava_key_layouts(tmp_path, tokenizer):
    """transformers writes LLaVA weights under the long-standing names (``language_model.model.*``,
    ``language_model.lm_head``, ``vision_tower.*``, ``multi_modal_projector.*``); its in-memory names
    (``model.language_model.*``, ``lm_head``, ``model.vision_tower.*``, ...) load as well."""
    from safetensors.torch import load_file, save_file

    cfg = _cfg("clip", "llama")
    model = _model(cfg, tokenizer)
    ids, mask, px = _inputs(model, tokenizer)
    with torch.no_grad():
        want = model(ids, mask, px).logits
    out = export_hf_llava(model, tokenizer, cfg, tmp_path / "hf")
    saved = load_file(out / "model.safetensors")
    assert (
        "language_model.model.embed_tokens.weight" in saved
        and "multi_modal_projector.linear_1.weight" in saved
    )
    renamed = {}
    for k, v in saved.items():
        if k.startswith("language_model.model."):
            k = "model.language_model." + k[len("language_model.model.") :]
        elif k == "language_model.lm_head.weight":
            k = "lm_head.weight"
        else:
            k = "model." + k
        renamed[k] = v
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    back, _, _ = load_checkpoint_model(out)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids, mask, px).logits, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("vision", "projector", "match"),
    [
        ("clip", "linear", "'linear'"),
        ("clip", "mlp3x_gelu", "'mlp3x_gelu'"),
        ("open_clip", "mlp2x_gelu", "open_clip"),
    ],
)
def test_export_refuses_what_hf_llava_cannot_express(tokenizer, vision, projector, match):
    cfg = _cfg(vision, "qwen2", projector)
    model = build_from_config(cfg, tokenizer)
    with pytest.raises(ConfigError, match=match) as e:
        build_hf_llava(model, tokenizer, cfg)
    assert "HF LLaVA" in str(e.value) and "cannot export" in str(e.value)


@pytest.fixture(scope="module")
def exported_teacher(smoke_teacher, tmp_path_factory):
    """configs/smoke.yaml's trained teacher, exported through the command line."""
    out = tmp_path_factory.mktemp("export") / "teacher_hf"
    args = ["--checkpoint", str(smoke_teacher / "teacher_sft"), "--out", str(out)]
    assert export_main(args) == 0
    assert export_main(args) == 2  # an existing export is not overwritten without --overwrite
    return out


def _generate_both(model, tok, export_dir, images, questions, max_new_tokens=8):
    """mllm_kd's Generator and transformers' LlavaForConditionalGeneration + AutoProcessor, batched greedy."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    gen = Generator.from_model(model.eval(), tok, max_new_tokens=max_new_tokens)
    captured = {}
    llm_generate = model.llm.generate

    def spy(*args, **kwargs):
        captured["ids"] = llm_generate(*args, **kwargs)
        return captured["ids"]

    model.llm.generate = spy
    prompts = [f"<image>\n{q}" if im is not None else q for im, q in zip(images, questions)]
    pixels = [gen.images(im)[None] if im is not None else None for im in images]
    ours_text = gen(prompts, pixels)
    del model.llm.generate

    hf = LlavaForConditionalGeneration.from_pretrained(str(export_dir)).eval()
    proc = AutoProcessor.from_pretrained(str(export_dir))
    convs = [
        [{"role": "user", "content": ([{"type": "image", "image": im}] if im is not None else []) + [
            {"type": "text", "text": q}
        ]}]
        for im, q in zip(images, questions)
    ]  # fmt: skip
    inputs = proc.apply_chat_template(
        convs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True
    )
    # the same prompt ids as mllm_kd's encoder (chat template, <image> expanded to the visual tokens)
    for row, mask, prompt in zip(inputs["input_ids"], inputs["attention_mask"], prompts):
        assert row[mask.bool()].tolist() == gen.encoder.prompt_ids(prompt)
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=max_new_tokens)
    hf_ids = out[:, inputs["input_ids"].shape[1] :]
    hf_text = [t.strip() for t in proc.batch_decode(hf_ids, skip_special_tokens=True)]
    return captured["ids"], hf_ids, ours_text, hf_text


def test_transformers_generates_the_same_tokens(smoke_teacher, exported_teacher, tmp_path):
    images = [Image.open(smoke_teacher / f"data/images/{i:05d}.png") for i in range(3)]
    images[1] = None  # a text-only prompt in the batch
    questions = ["What shape is in the image?", "Name a colour.", "What color is the shape? Be brief."]
    model, tok, cfg = load_checkpoint_model(smoke_teacher / "teacher_sft")
    ours, theirs, ours_text, hf_text = _generate_both(model, tok, exported_teacher, images, questions)
    assert torch.equal(ours, theirs) and ours_text == hf_text

    # The tiny smoke teacher answers with few distinct tokens; a perturbed copy (still a trained
    # checkpoint's architecture and tokenizer) makes the comparison of longer greedy paths meaningful.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.llm.parameters():
            p.add_(0.5 * torch.randn_like(p))
    export_hf_llava(model, tok, cfg, tmp_path / "perturbed")
    ours, theirs, ours_text, hf_text = _generate_both(model, tok, tmp_path / "perturbed", images, questions)
    assert len(set(ours.flatten().tolist())) > 8
    assert torch.equal(ours, theirs) and ours_text == hf_text


def test_resized_images_match_with_the_pil_backend(exported_teacher, smoke_teacher):
    """mllm_kd resizes with PIL; the processor's PIL backend gives the same pixels (torchvision: ~1e-2)."""
    from transformers import AutoProcessor

    model, tok, cfg = load_checkpoint_model(smoke_teacher / "teacher_sft")
    gen = Generator.from_model(model, tok, image_mean=cfg.vision.image_mean, image_std=cfg.vision.image_std)
    image = Image.open(smoke_teacher / "data/images/00004.png").resize((50, 41))
    proc = AutoProcessor.from_pretrained(str(exported_teacher), backend="pil")
    px = proc(images=image, text="<image>", return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(px, gen.images(image)[None], rtol=0, atol=1e-6)
    fast = AutoProcessor.from_pretrained(str(exported_teacher))
    px = fast(images=image, text="<image>", return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(px, gen.images(image)[None], rtol=0, atol=0.05)


def test_hf_llava_as_teacher_vision_source_and_init_from(smoke_teacher, exported_teacher, tmp_path, capsys):
    run = tmp_path / "run"
    common = [f"run_dir={run}", f"data_dir={smoke_teacher}/data", "train.max_steps=1", "train.batch_size=2"]
    # stage 1: a fresh student taking the HF LLaVA directory's vision tower, distilled from it as teacher
    code = stage_main(
        ["stage1"],
        "t",
        "t",
        [
            "--config",
            str(SMOKE),
            *common,
            f"teacher.checkpoint={exported_teacher}",
            f"model.vision.checkpoint={exported_teacher}",
        ],
    )
    assert code == 0, capsys.readouterr().err
    student, _, _ = load_checkpoint_model(run / "stage1")
    teacher, _, _ = load_checkpoint_model(exported_teacher)
    sv, tv = student.vision.state_dict(), teacher.vision.state_dict()
    assert sv.keys() == tv.keys() and all(torch.equal(sv[k], tv[k]) for k in sv)
    # stage 2 starting from the HF LLaVA directory itself
    code = stage_main(
        ["stage2"], "t", "t", ["--config", str(SMOKE), *common, f"init_from={exported_teacher}"]
    )
    assert code == 0, capsys.readouterr().err
    _, _, cfg = load_checkpoint_model(run / "stage2")
    assert cfg.llm.config["num_hidden_layers"] == teacher.llm.config.num_hidden_layers


def test_hf_llava_teacher_with_another_tokenizer_is_refused(
    smoke_teacher, exported_teacher, tmp_path, capsys
):
    teacher = tmp_path / "other_vocab_teacher"
    shutil.copytree(exported_teacher, teacher)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (teacher / name).unlink()
    train_bpe_tokenizer(["completely different words here"] * 5, teacher, vocab_size=300)
    run = tmp_path / "run"
    code = stage_main(
        ["stage1"],
        "t",
        "t",
        [
            "--config",
            str(SMOKE),
            f"run_dir={run}",
            f"data_dir={smoke_teacher}/data",
            f"teacher.checkpoint={teacher}",
            f"model.vision.checkpoint={exported_teacher}",
        ],
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "different vocabulary" in err and str(teacher) in err
    assert "same tokenizer" in err and "teacher's family" in err  # why, and what would work
    assert not (run / "stage1").exists()


def test_export_shows_progress_in_weight_bytes(smoke_teacher, tmp_path, capsys):
    from mllm_kd.checkpoint.native import WEIGHTS, resolve_checkpoint
    from mllm_kd.export import export_checkpoint

    size = (resolve_checkpoint(smoke_teacher / "teacher_sft") / WEIGHTS).stat().st_size
    export_checkpoint(smoke_teacher / "teacher_sft", tmp_path / "a")
    err = capsys.readouterr().err
    # tqdm's last refresh: all of read + write done, the total in bytes (unit-scaled), and the time.
    done = re.findall(r"export: 100%.*\| *([\d.]+)([kMG]?)B?/([\d.]+)([kMG]?)B? \[", err)
    assert done, err[-400:]
    total = float(done[-1][2]) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}[done[-1][3]]
    assert total == pytest.approx(2 * size, rel=0.01)
    assert "reading" in err and f"writing {tmp_path / 'a'}" in err
    export_checkpoint(smoke_teacher / "teacher_sft", tmp_path / "b", progress=False)
    assert "export:" not in capsys.readouterr().err
