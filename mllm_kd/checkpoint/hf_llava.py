"""Hugging Face LLaVA interoperability: export to, and import from, transformers' own LLaVA layout.

The layout is what ``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained``
read, with no mllm_kd code::

    config.json                 LlavaConfig: vision_config, text_config, image_token_index,
                                image_seq_length, vision_feature_layer, vision_feature_select_strategy
    model.safetensors           vision_tower.*, multi_modal_projector.linear_{1,2}.*,
                                language_model.model.*, language_model.lm_head.weight (the names
                                transformers writes; it reads its newer in-memory names too)
    generation_config.json      greedy, stopping at EOS and the chat template's end-of-turn token
    processor_config.json       LlavaProcessor: patch_size, vision_feature_select_strategy,
                                num_additional_image_tokens, image_token
    preprocessor_config.json    CLIPImageProcessor: bicubic resize to a square, no crop, 1/255, mean/std
    tokenizer files             the student's tokenizer, with the <image> token
    chat_template.jinja         the tokenizer's chat template, also taking LLaVA-style content lists

How mllm_kd's model maps onto it:

* vision tower: a transformers CLIP / SigLIP vision model (``vision.backend=hf``) is HF LLaVA's
  ``vision_tower`` as it is. ``feature_layer`` uses the same ``hidden_states`` numbering as HF's
  ``vision_feature_layer`` (0 = embeddings, -2 = second to last); ``drop_cls=True`` is HF's
  ``vision_feature_select_strategy="default"`` (drop token 0), ``drop_cls=False`` is ``"full"``.
* projector: HF LLaVA's ``multi_modal_projector`` is always ``linear_1 -> act -> linear_2``, i.e. our
  ``mlp2x_gelu`` (``nn.GELU()`` is HF's ``"gelu"``, the exact erf form).
* LLM: the causal LM's decoder is ``language_model``, its head ``lm_head``.

What the HF layout cannot express, and export therefore refuses: ``projector.type=linear`` and
``mlp3x_gelu`` or deeper (HF LLaVA has exactly two linear layers), and open_clip vision towers (HF LLaVA
builds its tower with ``AutoModel.from_config``; an open_clip ViT has no transformers config).

Import goes the other way: a directory whose ``config.json`` has ``model_type: llava`` becomes a
:class:`~mllm_kd.model.multimodal.MultimodalLM` (see :func:`load_hf_llava`), so it can be a teacher
(``teacher.checkpoint=DIR``), a student's starting point (``init_from=DIR``) or the source of a vision
tower (``model.vision.checkpoint=DIR``).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from torch import nn

from mllm_kd.atomic import atomic_dir
from mllm_kd.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from mllm_kd.errors import CheckpointError, ConfigError
from mllm_kd.model.llm import attention_implementation
from mllm_kd.model.multimodal import MultimodalLM
from mllm_kd.model.tokenization import IMAGE_TOKEN, image_token_id, prepare_tokenizer
from mllm_kd.model.vision import HFVisionTower

log = logging.getLogger(__name__)

LLAVA_MODEL_TYPE = "llava"

# Prepended to the tokenizer's chat template for the processor: LLaVA-style messages (content as a list of
# {"type": "image"} / {"type": "text", "text": ...} items) become plain strings with "<image>\n" per
# image, as mllm_kd writes its prompts; string contents pass through unchanged.
_CONTENT_LIST_PREAMBLE = (
    "{%- set ns = namespace(messages=[], text='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set ns.messages = ns.messages + [message] -%}"
    "{%- else -%}"
    "{%- set ns.text = '' -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set ns.text = ns.text + '" + IMAGE_TOKEN + "\\n' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text + item['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set ns.messages = ns.messages + [{'role': message['role'], 'content': ns.text}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.messages -%}"
)


# ---------------------------------------------------------------------------------------- detection
def is_hf_llava_dir(path: str | Path) -> bool:
    """True when ``path`` is a directory whose ``config.json`` says ``model_type: llava``."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == LLAVA_MODEL_TYPE
    except (json.JSONDecodeError, AttributeError):
        return False


# ------------------------------------------------------------------------------------------- export
def _check_exportable(model: MultimodalLM, model_cfg: ModelConfig) -> None:
    """Refuse what HF LLaVA cannot express, naming it and what would work."""
    if not isinstance(model.vision, HFVisionTower):
        raise ConfigError(
            f"cannot export to the Hugging Face LLaVA layout: the vision tower is {type(model.vision).__name__} "
            "(open_clip or torchvision); HF LLaVA "
            "builds its vision_tower from a transformers config (CLIP / SigLIP vision models). Use "
            "model.vision.backend=hf for a model you want to export."
        )
    proj = model.projector
    is_mlp2x = (
        isinstance(proj, nn.Sequential)
        and len(proj) == 3
        and isinstance(proj[0], nn.Linear)
        and isinstance(proj[1], nn.GELU)
        and getattr(proj[1], "approximate", "none") == "none"
        and isinstance(proj[2], nn.Linear)
    )
    if not is_mlp2x:
        raise ConfigError(
            f"cannot export to the Hugging Face LLaVA layout: the projector is {model_cfg.projector.type!r}, but "
            "HF LLaVA's multi_modal_projector is always linear_1 -> GELU -> linear_2 (our mlp2x_gelu); "
            "'linear' and 'mlp3x_gelu' or deeper have no HF LLaVA equivalent. Train with "
            "model.projector.type=mlp2x_gelu to export."
        )
    if not isinstance(model.vision.feature_layer, int):
        raise ConfigError("cannot export: model.vision.feature_layer must be one integer layer index")


def _stop_ids(tokenizer) -> list[int]:
    """EOS and the ChatML end-of-turn token, as :meth:`mllm_kd.model.generate.Generator.stop_ids`."""
    ids = {tokenizer.eos_token_id}
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        ids.add(end)
    return sorted(i for i in ids if i is not None)


def build_hf_llava(model: MultimodalLM, tokenizer, model_cfg: ModelConfig):
    """A transformers ``LlavaForConditionalGeneration`` with ``model``'s weights, and its ``LlavaProcessor``."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    _check_exportable(model, model_cfg)
    vision: HFVisionTower = model.vision  # type: ignore[assignment]
    vcfg = vision.model.config
    tcfg = model.llm.config
    strategy = "default" if vision.drop_cls else "full"
    patch = int(vcfg.patch_size)
    size = vision.image_size
    patches = (size // patch) ** 2
    # The processor writes (size // patch)^2 + num_additional_image_tokens - (1 if "default") <image> ids.
    extra = model.num_visual_tokens - patches + (1 if vision.drop_cls else 0)
    if extra not in (0, 1):
        raise ConfigError(
            f"cannot export: the vision tower yields {model.num_visual_tokens} tokens for {patches} patches, "
            "which HF LLaVA's processor cannot reproduce"
        )
    image_id = image_token_id(tokenizer)
    layer = int(vision.feature_layer)
    if layer == 0:
        # The same hidden state (the embeddings) counted from the end: transformers' LLaVA treats a
        # vision_feature_layer of 0 as "no hidden states requested" (it is passed as output_hidden_states).
        layer = -(int(vcfg.num_hidden_layers) + 1)
    text_config = tcfg.to_dict()
    if (text_config.get("quantization_config") or {}).get("quant_method") == "gguf":
        del text_config["quantization_config"]  # GGUF weights were dequantised to float on load
    config = LlavaConfig(
        vision_config=vcfg.to_dict(),
        text_config=text_config,
        image_token_index=image_id,
        image_seq_length=model.num_visual_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=layer,
        multimodal_projector_bias=model.projector[0].bias is not None,
        tie_word_embeddings=bool(getattr(tcfg, "tie_word_embeddings", False)),
    )
    config.text_config.vocab_size = model.vocab_size
    param = next(model.parameters())
    hf = LlavaForConditionalGeneration(config).to(param.dtype)
    hf.model.vision_tower.load_state_dict(vision.model.state_dict())
    hf.model.multi_modal_projector.linear_1.load_state_dict(model.projector[0].state_dict())
    hf.model.multi_modal_projector.linear_2.load_state_dict(model.projector[2].state_dict())
    hf.model.language_model.load_state_dict(model.llm.get_decoder().state_dict())
    hf.lm_head.load_state_dict(model.llm.get_output_embeddings().state_dict())
    hf.generation_config.eos_token_id = _stop_ids(tokenizer)
    hf.generation_config.pad_token_id = tokenizer.pad_token_id
    hf.generation_config.do_sample = False
    hf.eval()

    mean, std = list(model_cfg.vision.image_mean), list(model_cfg.vision.image_std)
    images = CLIPImageProcessor(  # = mllm_kd.data.encoding.ImageProcessor: bicubic square resize, no crop
        do_resize=True,
        size={"height": size, "width": size},
        resample=3,  # PIL.Image.BICUBIC
        do_center_crop=False,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=mean,
        image_std=std,
        do_convert_rgb=True,
    )
    template = getattr(tokenizer, "chat_template", None)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = "left"  # batched generation: every prompt ends where its answer starts
    tokenizer.init_kwargs["padding_side"] = "left"  # (saved with the tokenizer)
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy=strategy,
        chat_template=_CONTENT_LIST_PREAMBLE + template if template else None,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=extra,
    )
    return hf, processor


def export_hf_llava(model: MultimodalLM, tokenizer, model_cfg: ModelConfig, out: str | Path) -> Path:
    """Write ``model`` in the Hugging Face LLaVA layout (atomically: a crash leaves no half directory)."""
    hf, processor = build_hf_llava(model, tokenizer, model_cfg)
    out = Path(out)
    with atomic_dir(out) as tmp:
        hf.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
    return out


# ------------------------------------------------------------------------------------------- import
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def load_hf_llava(
    path: str | Path, device: str | torch.device = "cpu", what: str = "checkpoint"
) -> tuple[MultimodalLM, object, ModelConfig]:
    """A Hugging Face LLaVA directory as a :class:`MultimodalLM`. Returns ``(model, tokenizer, model_cfg)``.

    The vision tower and the language model are transformers' own modules as loaded by
    ``LlavaForConditionalGeneration.from_pretrained`` (which also reads older key layouts); the projector
    becomes our ``mlp2x_gelu``. ``model_cfg`` rebuilds the same architecture from configs alone, so the
    model saves as an ordinary mllm_kd checkpoint afterwards.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    path = Path(path)
    config = _read_json(path / "config.json")
    strategy = config.get("vision_feature_select_strategy", "default")
    layer = config.get("vision_feature_layer", -2)
    act = config.get("projector_hidden_act", "gelu")
    if strategy not in ("default", "full"):
        raise CheckpointError(f"{what} {path}: unknown vision_feature_select_strategy {strategy!r}")
    if not isinstance(layer, int):
        raise CheckpointError(
            f"{what} {path}: vision_feature_layer={layer} concatenates several layers; mllm_kd feeds one layer "
            "(model.vision.feature_layer) to the projector"
        )
    if act != "gelu":
        raise CheckpointError(
            f"{what} {path}: projector_hidden_act={act!r}; mllm_kd's mlp2x_gelu projector uses exact GELU ('gelu')"
        )
    try:
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(str(path)))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{what} {path}: cannot load its tokenizer: {e}") from e
    image_id = image_token_id(tokenizer)
    if image_id != config.get("image_token_index", config.get("image_token_id")):
        raise CheckpointError(
            f"{what} {path}: its tokenizer's {IMAGE_TOKEN} id is {image_id} but config.json says "
            f"image_token_index={config.get('image_token_index')}; mllm_kd marks the visual positions with "
            f"the {IMAGE_TOKEN} token"
        )
    attn = attention_implementation("auto", device)
    hf = LlavaForConditionalGeneration.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation=attn
    )
    vcfg, tcfg = hf.config.vision_config, hf.config.text_config

    vision = HFVisionTower(hf.model.vision_tower, int(layer), drop_cls=strategy == "default")
    hp = hf.model.multi_modal_projector
    projector = nn.Sequential(hp.linear_1, nn.GELU(), hp.linear_2)
    for linear in (projector[0], projector[2]):
        if linear.bias is None:  # multimodal_projector_bias=false: the same map with a zero bias
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype))

    # The causal LM around HF LLaVA's own decoder and head: built on the meta device (no weights, no
    # random init), then given the loaded modules.
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(tcfg, attn_implementation=attn)
    setattr(llm, llm.base_model_prefix, hf.model.language_model)
    llm.set_output_embeddings(hf.lm_head)
    left = [n for n, t in [*llm.named_parameters(), *llm.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{what} {path}: cannot map the language model's weights {left[:5]}")
    if llm.get_input_embeddings().weight.shape[0] < len(tokenizer):
        llm.resize_token_embeddings(len(tokenizer))
    model = MultimodalLM(vision, projector, llm, image_id)

    mean, std = _image_norm(path)
    model_cfg = ModelConfig(
        vision=VisionConfig(
            backend="hf",
            config=vcfg.to_dict(),
            feature_layer=int(layer),
            drop_cls=strategy == "default",
            image_mean=mean,
            image_std=std,
        ),
        projector=ProjectorConfig(type="mlp2x_gelu"),
        llm=LLMConfig(config=llm.config.to_dict()),
    )
    n_vis = config.get("image_seq_length")
    if n_vis is not None and n_vis != model.num_visual_tokens:
        log.warning(
            "%s: config.json says image_seq_length=%s but the vision tower yields %d tokens per image",
            path,
            n_vis,
            model.num_visual_tokens,
        )
    return model.to(device), tokenizer, model_cfg


def _image_norm(path: Path) -> tuple[list[float], list[float]]:
    """The image processor's mean/std (CLIP's when the directory has no image processor config)."""
    d = VisionConfig()
    cfg = None
    if (path / "processor_config.json").is_file():  # transformers 5 nests the image processor here
        cfg = _read_json(path / "processor_config.json").get("image_processor")
    if cfg is None and (path / "preprocessor_config.json").is_file():
        cfg = _read_json(path / "preprocessor_config.json")
    if cfg is None:
        log.warning("%s has no image processor config; using CLIP's image mean/std", path)
        return list(d.image_mean), list(d.image_std)
    if cfg.get("do_center_crop") and "shortest_edge" in (cfg.get("size") or {}):
        log.warning(
            "%s: its image processor resizes the shortest edge and centre-crops; mllm_kd resizes the whole "
            "image to a square (the same for square images)",
            path,
        )
    return list(cfg.get("image_mean", d.image_mean)), list(cfg.get("image_std", d.image_std))
