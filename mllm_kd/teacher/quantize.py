"""8-bit / 4-bit teacher LLMs through bitsandbytes."""

from __future__ import annotations

import logging

import torch

from mllm_kd.errors import ConfigError

log = logging.getLogger(__name__)


class _OnceFilter(logging.Filter):
    """Let a log message that starts with ``prefix`` through once per process."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


def quantize_llm(llm: torch.nn.Module, mode: str, device: torch.device | str = "cpu") -> int:
    """Replace the ``nn.Linear`` layers of an LLM (not its LM head) with bitsandbytes 8-bit / 4-bit layers.

    ``mode``: ``"8bit"`` (``Linear8bitLt``, LLM.int8 with outlier threshold 6) or ``"4bit"`` (``Linear4bit``,
    NF4). The weights are quantised on ``device``, the device the teacher runs on, and the quantised layers
    stay there: 8-bit layers quantised on the CPU and then moved with ``Module.to`` keep their int8 state
    on the CPU (``Module.to`` replaces each parameter's ``.data`` only), and bitsandbytes' CUDA matmul
    then stops with "Expected a cuda device, but got: cpu". The LM head stays a full-precision
    ``nn.Linear`` so the fused losses still apply. Returns the number of layers replaced.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ConfigError(
            f"teacher.quantize={mode} needs bitsandbytes: install the `gpu` extra (pip install -e '.[gpu]') "
            "or just bitsandbytes (pip install bitsandbytes)"
        ) from e
    if mode not in ("8bit", "4bit"):
        raise ConfigError(f"teacher.quantize must be 8bit or 4bit, got {mode!r}")
    # LLM.int8 casts float32 inputs to float16 inside every matmul (by design); say it once, not per call.
    cast_warning = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in cast_warning.filters):
        cast_warning.addFilter(_OnceFilter("MatMul8bitLt: inputs will be cast"))
    head = llm.get_output_embeddings()
    replaced = 0
    for parent in list(llm.modules()):
        if parent is head:
            continue
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            w, b = child.weight.data, None if child.bias is None else child.bias.data
            if mode == "8bit":
                new = bnb.nn.Linear8bitLt(
                    child.in_features,
                    child.out_features,
                    bias=b is not None,
                    has_fp16_weights=False,
                    threshold=6.0,
                )
                new.weight = bnb.nn.Int8Params(w.float().cpu(), requires_grad=False, has_fp16_weights=False)
            else:
                new = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=b is not None, quant_type="nf4"
                )
                new.weight = bnb.nn.Params4bit(w.float().cpu(), requires_grad=False, quant_type="nf4")
            if b is not None:
                new.bias = torch.nn.Parameter(b.float().cpu(), requires_grad=False)
            setattr(parent, name, new.to(device))  # .to() quantises
            replaced += 1
    return replaced
