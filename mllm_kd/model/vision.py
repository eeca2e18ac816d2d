"""Vision towers (HF CLIP/SigLIP, open_clip ViTs, torchvision CNNs and EfficientNet-Lite) and their builders.

Built by explicit builder functions keyed on ``vision.backend``, never on substrings of names or paths.
"""

from __future__ import annotations

import logging
import pickle

import torch
from torch import nn

from mllm_kd.config import VisionConfig
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


# EfficientNet-Lite, which the torchvision backend takes too (the same feature-map tower): name -> the
# efficientnet-lite-pytorch architecture; its ImageNet Lite0 weights: data_prep/weights.py
EFFICIENTNET_LITE = {f"efficientnet_lite{i}": f"efficientnet-lite{i}" for i in range(5)}


def build_torchvision_backbone(cfg: VisionConfig) -> nn.Module:
    """The classification model ``cfg.torchvision_model`` with weights from ``path``, ``weights`` or random:
    one of torchvision's, or one of :data:`EFFICIENTNET_LITE` (``efficientnet_lite0``: EfficientNet-Lite from the
    ``efficientnet-lite-pytorch`` package, weights from a local ``path`` only)."""
    import torchvision

    name = cfg.torchvision_model
    if name in EFFICIENTNET_LITE:
        if cfg.weights:
            raise ConfigError(
                f"model.vision.weights={cfg.weights!r}: {name} has no torchvision weights enum; give its weights "
                "file as model.vision.path (python -m mllm_kd.data_prep.weights efficientnet_lite0 prints it)"
            )
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ConfigError(
                f"model.vision.torchvision_model={name} needs the efficientnet_lite_pytorch package: pip install "
                "efficientnet-lite-pytorch (the efficientnet extra)"
            ) from None
        model = EfficientNet.from_name(EFFICIENTNET_LITE[name])
    elif name in torchvision.models.list_models(torchvision.models):
        model = torchvision.models.get_model(name, weights=cfg.weights)  # weights=None: random init
    else:
        raise ConfigError(
            f"model.vision.torchvision_model={name!r} is not a torchvision classification model "
            f"(torchvision.models.list_models() lists them) nor one of {sorted(EFFICIENTNET_LITE)}"
        )
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
                f"model.vision.path={cfg.path} does not fit {name}: missing keys {missing[:5]}, "
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
