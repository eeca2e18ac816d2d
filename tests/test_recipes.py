"""The paper recipes (configs/paper_*.yaml) resolve, pair a teacher and student of one family, and build
and run at tiny size through the same code path; the student's LLM swaps with one config line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMOKE
from omegaconf import OmegaConf

from mllm_kd.checkpoint.native import build_from_config, load_checkpoint_model
from mllm_kd.cli import main as stage_main
from mllm_kd.cli import stage_config
from mllm_kd.config import STAGE_NAMES
from mllm_kd.model.tokenization import CHATML_TEMPLATE, image_token_id, load_tokenizer, train_bpe_tokenizer
from mllm_kd.teacher.load import check_compatible
from mllm_kd.train.stage import init_model

PAPER = sorted((ROOT / "configs").glob("paper_*.yaml"))
GPUS = 8  # the recipes express the paper's global batch as batch_size x grad_accum x 8 GPUs

# The real models the recipes name (their config.json: model_type and size), and a tiny stand-in of the
# same model_type for each. The Qwen2.5 family shares one tokenizer (151,936-row embeddings).
REAL = {
    "Qwen2.5-3B-Instruct": {"model_type": "qwen2", "hidden_size": 2048, "num_hidden_layers": 36},
    "Qwen2.5-1.5B": {"model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28},
    "Qwen2.5-0.5B": {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24},
    "siglip-so400m-patch14-384": {"model_type": "siglip", "hidden_size": 1152, "patch_size": 14},
}
TINY_LLM = {
    "Qwen2.5-3B-Instruct": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4},
    "Qwen2.5-1.5B": {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4},
    "Qwen2.5-0.5B": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2},
}
TINY_SIGLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}
TINY_IMAGE, PATCH = 56, 14  # the real patch size; 4 x 4 = 16 visual tokens (SigLIP has no CLS)


def _name(path: str) -> str:
    return Path(path).name


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """Tiny stand-ins laid out like the real downloads: HF model directories under their repo names."""
    from transformers import AutoConfig, AutoModelForCausalLM, SiglipConfig, SiglipModel

    root = tmp_path_factory.mktemp("models")
    texts = ["a red circle", "a blue square", "what shape is it?", "user assistant system"] * 4
    tok_dir = train_bpe_tokenizer(texts, root / "_tokenizer", vocab_size=300)
    tok = load_tokenizer(tok_dir)
    assert tok.chat_template == CHATML_TEMPLATE  # Qwen2.5 uses ChatML too
    torch.manual_seed(0)
    for name, tiny in TINY_LLM.items():
        cfg = AutoConfig.for_model(
            REAL[name]["model_type"],
            intermediate_size=2 * tiny["hidden_size"],
            num_key_value_heads=2,
            max_position_embeddings=256,
            vocab_size=len(tok),
            tie_word_embeddings=True,
            **tiny,
        )
        AutoModelForCausalLM.from_config(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    vision = {**TINY_SIGLIP, "image_size": TINY_IMAGE, "patch_size": PATCH}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(
        root / "siglip-so400m-patch14-384"
    )  # a full SigLIP (text + vision), as google/siglip-so400m-patch14-384 is
    return root


def test_there_are_paper_recipes():
    assert {p.name for p in PAPER} >= {"paper_qwen2.5_3b_to_0.5b.yaml", "paper_qwen2.5_3b_to_1.5b.yaml"}


@pytest.mark.parametrize("recipe", PAPER, ids=lambda p: p.name)
def test_paper_recipe_resolves_for_every_stage(recipe, tmp_path):
    expect = {  # stage: (data file, LR, global batch, trained projector / LLM)
        "teacher_pt": ("blip_laion_cc_sbu_558k.json", 1e-3, 256, ("full", "frozen")),
        "teacher_sft": ("llava_v1_5_mix665k.json", 2e-5, 128, ("full", "full")),
        "stage1": ("blip_laion_cc_sbu_558k.json", 1e-3, 256, ("full", "frozen")),
        "stage2": ("llava_v1_5_mix665k.json", 2e-5, 128, ("full", "full")),
        "stage3": ("llava_v1_5_mix665k.json", 2e-5, 128, ("full", "full")),
    }
    for stage in STAGE_NAMES:
        cfg = stage_config(recipe, stage, [f"run_dir={tmp_path}", "models_dir=/m", "data_dir=/d"])
        data, lr, batch, (proj, llm) = expect[stage]
        model = cfg.teacher.model if stage.startswith("teacher") else cfg.model
        assert _name(cfg.data.path) == data and cfg.data.path.startswith("/d/")
        assert cfg.optim.lr == lr and cfg.train.batch_size * cfg.train.grad_accum * GPUS == batch
        assert (cfg.trainable.vision, cfg.trainable.projector, cfg.trainable.llm) == ("frozen", proj, llm)
        assert cfg.data.max_length == 2048 and cfg.train.precision == "bf16" and cfg.train.epochs == 1
        assert cfg.data.template == ("caption" if data.startswith("blip") else "auto")
        assert cfg.optim.warmup_ratio == 0.03 and cfg.loss.kind == "fkl" and cfg.loss.temperature == 1
        assert cfg.loss.w_resp == cfg.loss.w_vis == cfg.loss.w_rel == 1  # (used by stages 1 and 3)
        assert model.vision.path == "/m/siglip-so400m-patch14-384" and model.vision.backend == "hf"
        assert (model.vision.feature_layer, model.vision.drop_cls) == (-2, False)
        assert model.projector.type == "mlp2x_gelu"
        if stage.startswith("teacher"):
            assert model.llm.path == "/m/Qwen2.5-3B-Instruct"
        if stage == "stage1":
            assert cfg.init_from is None and cfg.teacher.checkpoint == f"{tmp_path}/teacher_sft"
        if stage in ("stage2", "stage3"):
            assert cfg.init_from == f"{tmp_path}/{'stage1' if stage == 'stage2' else 'stage2'}"


@pytest.mark.parametrize("recipe", PAPER, ids=lambda p: p.name)
def test_paper_recipe_teacher_and_student_share_a_family(recipe):
    cfg = stage_config(recipe, "stage3", ["models_dir=/m"])
    teacher, student = _name(cfg.teacher.model.llm.path), _name(cfg.model.llm.path)
    assert teacher == "Qwen2.5-3B-Instruct" and student in ("Qwen2.5-0.5B", "Qwen2.5-1.5B")
    assert recipe.stem.endswith("_to_" + student.split("-")[1].lower())
    assert REAL[teacher]["model_type"] == REAL[student]["model_type"]
    assert REAL[student]["hidden_size"] < REAL[teacher]["hidden_size"]
    # same tokenizer (no model.tokenizer: each from its LLM directory) and the same vision tower, so both
    # see the same ids and the same 729 visual tokens per image
    assert cfg.model.tokenizer is None and cfg.teacher.model.tokenizer is None
    assert cfg.model.vision == cfg.teacher.model.vision


@pytest.mark.parametrize("recipe", PAPER, ids=lambda p: p.name)
def test_paper_recipe_architectures_build_and_run(recipe, models_dir, tmp_path):
    cfg = stage_config(recipe, "stage1", [f"run_dir={tmp_path}", f"models_dir={models_dir}"])
    student, s_tok, _ = init_model(cfg, cfg.model)  # the stage's own set-up: tokenizer from llm.path
    t_tok = load_tokenizer(cfg.teacher.model.llm.path)
    teacher = build_from_config(cfg.teacher.model, t_tok)
    assert type(student.vision.model).__name__ == type(teacher.vision.model).__name__ == "SiglipVisionModel"
    assert type(student.llm).__name__ == type(teacher.llm).__name__ == "Qwen2ForCausalLM"
    assert student.num_visual_tokens == teacher.num_visual_tokens == (TINY_IMAGE // PATCH) ** 2
    assert student.llm.config.hidden_size < teacher.llm.config.hidden_size
    check_compatible(teacher, t_tok, student, s_tok, "teacher")

    img = image_token_id(s_tok)
    ids = torch.tensor([[5, 6] + [img] * student.num_visual_tokens + [7, 8, 9]])
    px = torch.randn(1, 3, TINY_IMAGE, TINY_IMAGE)
    with torch.no_grad():
        s_out = student.eval()(ids, torch.ones_like(ids), px)
        t_out = teacher.eval()(ids, torch.ones_like(ids), px)
    assert s_out.logits.shape == t_out.logits.shape == (1, ids.shape[1], len(s_tok))
    assert torch.isfinite(s_out.logits).all() and torch.isfinite(t_out.logits).all()


def test_swap_the_student_llm_with_one_config_line(smoke_teacher, tmp_path, capsys):
    """configs/smoke.yaml's student is a Qwen2; `model.llm.config.model_type=llama` makes it a Llama."""
    run = tmp_path / "run"
    teacher = smoke_teacher / "teacher_sft"
    args = [
        "--config",
        str(SMOKE),
        f"run_dir={run}",
        f"data_dir={smoke_teacher}/data",
        f"teacher.checkpoint={teacher}",
        f"model.vision.checkpoint={teacher}",
        "train.max_steps=2",
        "model.llm.config.model_type=llama",  # the swap
    ]
    assert stage_main(["stage1"], "t", "t", args) == 0, capsys.readouterr().err
    saved = OmegaConf.load(run / "stage1" / "final" / "model.yaml")
    assert saved.llm.config.model_type == "llama"
    model, _, _ = load_checkpoint_model(run / "stage1")
    assert type(model.llm).__name__ == "LlamaForCausalLM"
    # and the next stage goes on from it (stage 2 reads the architecture from the checkpoint)
    assert stage_main(["stage2"], "t", "t", [*args[:-2], "train.max_steps=1"]) == 0, capsys.readouterr().err
    assert OmegaConf.load(run / "stage2" / "final" / "model.yaml").llm.config.model_type == "llama"
