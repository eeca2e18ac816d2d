"""Model assembly: vision tower -> projector -> causal LLM.

Built by explicit builder functions keyed on config fields (`vision.backend`, `projector.type`,
`llm.config.model_type` through transformers' own Auto classes), never on substrings of names or paths.

Sequence layout: the data pipeline expands every ``<image>`` placeholder into ``num_visual_tokens``
copies of the ``<image>`` token id. :meth:`MultimodalLM.embed` replaces the embeddings at those
positions with the projected image features, image after image in row-major order, so each sample
keeps its own visual span and batches of any size work with padding.
"""

from __future__ import annotations

import importlib.util
import logging
import pickle
import re
from dataclasses import dataclass

import torch
from torch import nn

from mllm_kd.config import LLMConfig, ModelConfig, ProjectorConfig, TrainableConfig, VisionConfig
from mllm_kd.errors import ConfigError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- vision
class HFVisionTower(nn.Module):
    """A transformers CLIP / SigLIP vision model; features from one hidden layer."""

    def __init__(self, model: nn.Module, feature_layer: int, drop_cls: bool):
        super().__init__()
        self.model = model
        self.feature_layer = feature_layer
        self.drop_cls = drop_cls
        self.image_size = int(model.config.image_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> ``[N, n_tokens, d_vision]``."""
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        feats = out.hidden_states[self.feature_layer]
        return feats[:, 1:] if self.drop_cls else feats


class OpenClipVisionTower(nn.Module):
    """An open_clip vision tower; features from one block via ``forward_intermediates``.

    ViTs give ``[N, tokens, width]`` (with the class token unless ``drop_cls``); convolutional towers
    (``ModifiedResNet``, ``layers`` given as a tuple) give their feature map flattened row by row,
    ``[N, H*W, channels]``, and have no class token to drop.
    """

    def __init__(self, visual: nn.Module, feature_layer: int, drop_cls: bool, arch_config: dict):
        super().__init__()
        self.visual = visual
        self.arch_config = arch_config  # CLIPVisionCfg kwargs + embed_dim: rebuilds the architecture
        self.feature_layer = feature_layer
        self.drop_cls = drop_cls
        self.is_vit = hasattr(visual, "transformer")
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        if feature_layer == 0 and self.is_vit:
            raise ConfigError(
                "model.vision.feature_layer=0 (the patch embeddings) is not available for open_clip ViTs"
            )
        self._pruned: list[str] = []
        if not self.is_vit:
            self._prune_unused_stages()

    _RESNET_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")

    def _prune_unused_stages(self) -> None:
        """Drop the ResNet stages after ``feature_layer`` and the attention pool: they never run.

        Parameter counts then state the tower that is used, and checkpoints do not carry dead weights
        (a checkpoint saved with them still loads: their keys are ignored).
        """
        n = len(self._RESNET_STAGES)
        if not -n <= self.feature_layer < n:
            raise ConfigError(
                f"model.vision.feature_layer={self.feature_layer} is out of range for a ModifiedResNet "
                f"(stages 0..{n - 1}: stem, layer1..layer4; negative counts from the end)"
            )
        last = self.feature_layer % n
        for name in (*self._RESNET_STAGES[last + 1 :], "attnpool"):
            if isinstance(getattr(self.visual, name, None), nn.Module):
                setattr(self.visual, name, nn.Identity())
                self._pruned.append(f"visual.{name}.")
        self._register_load_state_dict_pre_hook(self._drop_pruned_keys)

    def _drop_pruned_keys(self, state_dict, prefix, *_args) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            if any(key[len(prefix) :].startswith(p) for p in self._pruned):
                del state_dict[key]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.is_vit:
            out = self.visual.forward_intermediates(
                pixel_values, indices=[self.feature_layer], output_fmt="NCHW", intermediates_only=True
            )
            return out["image_intermediates"][0].flatten(2).transpose(1, 2)
        # feature_layer follows HF's hidden_states numbering (0 = embeddings, k = after block k, -1 = last
        # block), so one value means the same layer on both back-ends; open_clip numbers blocks from 0.
        index = self.feature_layer - 1 if self.feature_layer > 0 else self.feature_layer
        out = self.visual.forward_intermediates(
            pixel_values,
            indices=[index],
            output_fmt="NLC",
            intermediates_only=True,
            output_extra_tokens=not self.drop_cls,
        )
        feats = out["image_intermediates"][0]
        if not self.drop_cls and "image_intermediates_prefix" in out:
            feats = torch.cat([out["image_intermediates_prefix"][0], feats], dim=1)
        return feats


class TorchvisionVisionTower(nn.Module):
    """A torchvision classification backbone; one feature map flattened row by row, ``[N, H*W, C]``.

    ``feature_node`` names the map: a submodule's output (``features.16`` of ``mobilenet_v2``, ``layer3``
    of ``resnet50``) or any torch.fx node name of the model. torchvision's ``create_feature_extractor``
    keeps only the layers that produce it, so the classifier and later stages are not part of the tower.
    A frozen tower keeps its batch-norm layers in eval mode (ImageNet statistics) even when the model is
    put in training mode.
    """

    def __init__(self, backbone: nn.Module, model_name: str, feature_node: str, image_size: int):
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        tracer_kwargs = None
        _, nodes = get_graph_node_names(backbone)
        if feature_node not in nodes:
            try:  # a submodule: trace modules of its type as leaves, so its output is one node
                leaf = type(backbone.get_submodule(feature_node))
            except AttributeError:
                names = [n for n, _ in backbone.named_children()]
                raise ConfigError(
                    f"model.vision.feature_node={feature_node!r} is neither a submodule nor a torch.fx node of "
                    f"torchvision's {model_name} (its top-level modules: {names})"
                ) from None
            tracer_kwargs = {"leaf_modules": [leaf]}
        self.body = create_feature_extractor(
            backbone.eval(), return_nodes={feature_node: "features"}, tracer_kwargs=tracer_kwargs
        )
        self.model_name, self.feature_node, self.image_size = model_name, feature_node, int(image_size)
        self.eval()  # no batch statistics while the model is assembled (its shape probes run the tower)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> ``[N, h*w, channels]``."""
        feats = self.body(pixel_values)["features"]
        if feats.ndim != 4:
            raise ConfigError(
                f"model.vision.feature_node={self.feature_node!r} gives a {feats.ndim}-d tensor; pick a "
                "convolutional feature map [N, C, H, W]"
            )
        return feats.flatten(2).transpose(1, 2)

    def train(self, mode: bool = True) -> TorchvisionVisionTower:
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.parameters()):
            self.body.eval()
        return self


def build_torchvision_backbone(cfg: VisionConfig) -> nn.Module:
    """The torchvision model ``cfg.torchvision_model`` with weights from ``path``, ``weights`` or random."""
    import torchvision

    name = cfg.torchvision_model
    if name not in torchvision.models.list_models(torchvision.models):
        raise ConfigError(
            f"model.vision.torchvision_model={name!r} is not a torchvision classification model "
            "(torchvision.models.list_models() lists them)"
        )
    model = torchvision.models.get_model(name, weights=cfg.weights)  # weights=None: random init
    if cfg.path:
        try:
            state = torch.load(cfg.path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError) as e:
            raise ConfigError(
                f"model.vision.path={cfg.path}: cannot read a torchvision state dict ({e})"
            ) from e
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"model.vision.path={cfg.path} does not fit torchvision's {name}: missing keys {missing[:5]}, "
                f"unexpected keys {unexpected[:5]}"
            )
    return model


def build_hf_vision(cfg: VisionConfig) -> nn.Module:
    from transformers import AutoConfig, AutoModel, CLIPVisionModel, SiglipVisionModel

    if cfg.path:
        # Full CLIP/SigLIP checkpoints hold a text tower too; load only the vision model.
        model_type = AutoConfig.from_pretrained(cfg.path).model_type
        loaders = {
            "clip": CLIPVisionModel,
            "clip_vision_model": CLIPVisionModel,
            "siglip": SiglipVisionModel,
            "siglip_vision_model": SiglipVisionModel,
        }
        loader = loaders.get(model_type, AutoModel)
        return loader.from_pretrained(cfg.path)
    if not cfg.config or "model_type" not in cfg.config:
        raise ConfigError(
            "model.vision: give `path` or a `config` with a model_type (e.g. clip_vision_model)"
        )
    kwargs = dict(cfg.config)
    hf_cfg = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    return AutoModel.from_config(hf_cfg)


def build_open_clip_vision(cfg: VisionConfig) -> tuple[nn.Module, dict]:
    """An open_clip ViT and the config dict that rebuilds it (``embed_dim`` + ``CLIPVisionCfg`` fields)."""
    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    if cfg.config:
        arch = dict(cfg.config)
        arch.setdefault("embed_dim", arch.get("width", 512))
        kwargs = dict(arch)
        visual = _build_vision_tower(int(kwargs.pop("embed_dim")), CLIPVisionCfg(**kwargs))
    elif cfg.open_clip_model:
        model = open_clip.create_model(cfg.open_clip_model, pretrained=cfg.path or None)
        known = open_clip.get_model_config(cfg.open_clip_model)
        arch = {"embed_dim": known["embed_dim"], **known["vision_cfg"]}
        visual = model.visual
    else:
        raise ConfigError(
            "model.vision (open_clip): give `open_clip_model` (+ optional `path`) or a `config`"
        )
    return visual, arch


def build_vision_tower(cfg: VisionConfig) -> nn.Module:
    if cfg.backend == "hf":
        tower: nn.Module = HFVisionTower(build_hf_vision(cfg), cfg.feature_layer, cfg.drop_cls)
    elif cfg.backend == "torchvision":
        tower = TorchvisionVisionTower(
            build_torchvision_backbone(cfg), cfg.torchvision_model, cfg.feature_node, cfg.image_size or 224
        )
    else:
        visual, arch = build_open_clip_vision(cfg)
        tower = OpenClipVisionTower(visual, cfg.feature_layer, cfg.drop_cls, arch)
    if cfg.image_size is not None and cfg.image_size != tower.image_size:
        raise ConfigError(
            f"model.vision.image_size={cfg.image_size} but the vision model takes {tower.image_size}px images"
        )
    return tower


# ------------------------------------------------------------------------------------------ projector
def build_projector(cfg: ProjectorConfig, vision_dim: int, llm_dim: int) -> nn.Module:
    """``linear`` or ``mlp{N}x_gelu`` (LLaVA's naming): ``[..., vision_dim]`` -> ``[..., llm_dim]``."""
    if cfg.type == "linear":
        return nn.Linear(vision_dim, llm_dim)
    match = re.fullmatch(r"mlp(\d+)x_gelu", cfg.type)
    if not match:
        raise ConfigError(f"unknown projector type {cfg.type!r}")
    layers: list[nn.Module] = [nn.Linear(vision_dim, llm_dim)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(llm_dim, llm_dim)]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------------ LLM
def attention_implementation(requested: str, device: torch.device | str) -> str:
    """FlashAttention-2 on CUDA when the `flash-attn` package is installed, PyTorch SDPA otherwise."""
    if requested != "auto":
        return requested
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build_llm(cfg: LLMConfig, device: torch.device | str = "cpu", vocab_size: int | None = None) -> nn.Module:
    """Any ``AutoModelForCausalLM``: from a local directory (or GGUF file) or random from a config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    attn = attention_implementation(cfg.attn_implementation, device)
    if cfg.path:
        kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        llm = AutoModelForCausalLM.from_pretrained(
            cfg.path, attn_implementation=attn, dtype=torch.float32, **kwargs
        )
    elif cfg.config:
        kwargs = dict(cfg.config)
        if "model_type" not in kwargs:
            raise ConfigError("model.llm.config needs a model_type (e.g. qwen2, llama)")
        if vocab_size is not None:
            kwargs.setdefault("vocab_size", vocab_size)
        hf_cfg = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
        llm = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn)
    else:
        raise ConfigError("model.llm: give `path` (a local model directory) or `config` (random init)")
    if cfg.keep_layers is not None:
        keep_decoder_layers(llm, cfg.keep_layers)
    log.info("LLM %s with %s attention", type(llm).__name__, attn)
    return llm


def keep_decoder_layers(llm: nn.Module, keep: list[int]) -> None:
    """Keep only the decoder layers ``keep`` (in that order): a smaller student derived from a big LLM."""
    layers = llm.get_decoder().layers
    if not keep or any(not 0 <= i < len(layers) for i in keep):
        raise ConfigError(
            f"model.llm.keep_layers={keep} must be indices into the {len(layers)} decoder layers"
        )
    new = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(new):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx  # the KV cache is indexed by layer position
    llm.get_decoder().layers = new
    llm.config.num_hidden_layers = len(new)
    if getattr(llm.config, "layer_types", None) is not None:
        llm.config.layer_types = [llm.config.layer_types[i] for i in keep]


def compile_decoder_layers(llm: nn.Module) -> int:
    """``torch.compile`` each decoder layer in place (one graph, reused by every layer: torchtune's way).

    The modules stay what they were (``nn.Module.compile``), so state dicts, FSDP2 shards and the fused
    losses' view of the LM head are unchanged. Returns the number of layers compiled.
    """
    layers = llm.get_decoder().layers
    for layer in layers:
        layer.compile()
    return len(layers)


# ---------------------------------------------------------------------------------------- the MLLM
@dataclass
class MLLMOutput:
    logits: torch.Tensor | None  # [B, T, V] (None when not asked for)
    hidden: torch.Tensor  # [B, T, d_llm] final hidden states (after the final norm)


class MultimodalLM(nn.Module):
    """Vision tower -> projector -> LLM, with the ``<image>`` token id used for visual positions."""

    def __init__(self, vision: nn.Module, projector: nn.Module, llm: nn.Module, image_token_id: int):
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.image_token_id = image_token_id
        self.num_visual_tokens = self._count_visual_tokens()

    @torch.no_grad()
    def _count_visual_tokens(self) -> int:
        size = self.vision.image_size
        param = next(self.vision.parameters())
        feats = self.vision(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype))
        return int(feats.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.llm.get_output_embeddings().weight.shape[0])

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> ``[N, num_visual_tokens, d_llm]``."""
        param = next(self.vision.parameters())
        feats = self.vision(pixel_values.to(device=param.device, dtype=param.dtype))
        return self.projector(feats.to(next(self.projector.parameters()).dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings ``[B, T, d]`` with the image features written at the ``<image>`` positions."""
        vis_mask = input_ids == self.image_token_id
        embed = self.llm.get_input_embeddings()
        embeds = embed(input_ids.masked_fill(vis_mask, 0))
        n_vis = int(vis_mask.sum())
        if n_vis == 0:
            if pixel_values is not None and pixel_values.shape[0] > 0:
                raise ValueError(f"{pixel_values.shape[0]} images given but the batch has no <image> tokens")
            return embeds
        if pixel_values is None:
            raise ValueError("the batch has <image> tokens but no pixel_values")
        feats = self.encode_images(pixel_values)
        if feats.shape[0] * feats.shape[1] != n_vis:
            raise ValueError(
                f"{n_vis} <image> token positions but {feats.shape[0]} images x {feats.shape[1]} visual tokens"
            )
        embeds = embeds.clone()
        embeds[vis_mask] = feats.reshape(-1, feats.shape[-1]).to(embeds.dtype)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> MLLMOutput:
        """Run the LLM on text + images.

        Args:
            input_ids: ``[B, T]`` with ``num_visual_tokens`` ``<image>`` ids per image.
            attention_mask: ``[B, T]`` (1 = real token).
            pixel_values: ``[N_images, 3, H, W]`` in the order the images appear in the batch.
            return_logits: False skips the LM head (fused losses work from ``hidden``).
        """
        embeds = self.embed(input_ids, pixel_values)
        decoder = self.llm.get_decoder()
        hidden = decoder(
            inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        logits = self.llm.get_output_embeddings()(hidden) if return_logits else None
        return MLLMOutput(logits=logits, hidden=hidden)


def build_model(
    cfg: ModelConfig, image_token_id: int, vocab_size: int, device: str | torch.device = "cpu"
) -> MultimodalLM:
    """Build a :class:`MultimodalLM` from its config (weights from paths, or random from configs).

    ``cfg.vision.checkpoint`` (a vision tower taken from another mllm_kd checkpoint) is resolved by
    :func:`mllm_kd.checkpoint.build_from_config`, which calls this.
    """
    vision = build_vision_tower(cfg.vision)
    llm = build_llm(cfg.llm, device=device, vocab_size=vocab_size)
    if llm.get_input_embeddings().weight.shape[0] < vocab_size:
        llm.resize_token_embeddings(vocab_size)
    vision_dim = _vision_width(vision)
    projector = build_projector(cfg.projector, vision_dim, llm.config.get_text_config().hidden_size)
    return MultimodalLM(vision, projector, llm, image_token_id)


@torch.no_grad()
def _vision_width(vision: nn.Module) -> int:
    size = vision.image_size
    return int(vision(torch.zeros(1, 3, size, size)).shape[-1])


def apply_trainable(model: MultimodalLM, trainable: TrainableConfig) -> dict[str, int]:
    """The one place that decides which parameters train. Returns trainable parameter counts per part.

    A trained vision tower keeps frozen what cannot reach the selected features (the blocks after
    ``feature_layer``, a final norm or pooling head): such parameters would get no gradient, which
    DDP treats as an error.
    """
    counts = {}
    for part in ("vision", "projector", "llm"):
        module: nn.Module = getattr(model, part)
        mode = getattr(trainable, part)
        for p in module.parameters():
            p.requires_grad_(mode == "full")
        if part == "vision" and mode == "full":
            _freeze_unreachable(module)
        counts[part] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return counts


def _freeze_unreachable(vision: nn.Module) -> None:
    size = vision.image_size
    param = next(vision.parameters())
    vision.zero_grad(set_to_none=True)
    vision(
        torch.randn(1, 3, size, size, device=param.device, dtype=param.dtype)
    ).float().square().sum().backward()
    for p in vision.parameters():
        if p.grad is None:
            p.requires_grad_(False)
        p.grad = None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
