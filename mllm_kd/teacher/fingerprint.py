"""What a teacher cache was built for, and the comparison that refuses a cache built for something else.

The manifest records the data (a SHA-256 of the LLaVA JSON file, or the shard names and sizes), the
tokenizer (hashes of the vocabulary and the chat template), the teacher checkpoint (a fingerprint of its
files: each small file hashed whole, large files by their size and 64 evenly spaced 64 KiB blocks),
``max_length``, the template, the system prompt, the visual-token count, the image preprocessing, ``k``,
the relation representation and the quantisation; for ``loss.cross_tokenizer``, that option and
``data.template`` (the teacher's encoding: its tokenizer is part of the checkpoint's fingerprint). :meth:`mllm_kd.teacher.cache.CachedTeacher.check`
refuses a cache whose record differs from the stage's, naming every difference.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import braceexpand

from mllm_kd.checkpoint.hf_llava import is_hf_llava_dir
from mllm_kd.checkpoint.native import resolve_checkpoint
from mllm_kd.data.encoding import ConversationEncoder

_SMALL_FILE = 4 << 20  # files up to this size are hashed whole
_BLOCK, _BLOCKS = 64 << 10, 64  # larger files: size + 64 evenly spaced 64 KiB blocks


def _sha256_file(path: Path, sampled: bool = False) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if not sampled or size <= _SMALL_FILE:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            for i in range(_BLOCKS):
                f.seek((size - _BLOCK) * i // (_BLOCKS - 1))
                h.update(f.read(_BLOCK))
    return h.hexdigest()


def data_fingerprint(data_cfg) -> dict:
    """What identifies the training data: the JSON file's SHA-256, or the WebDataset shards' names + sizes."""
    if data_cfg.format == "llava_json":
        path = Path(data_cfg.path)
        return {"format": "llava_json", "sha256": _sha256_file(path), "max_samples": data_cfg.max_samples}
    shards = [Path(u) for u in braceexpand.braceexpand(data_cfg.path)]
    listing = [[p.name, p.stat().st_size] for p in shards]
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return {"format": "wds", "sha256": digest, "shards": len(listing), "max_samples": data_cfg.max_samples}


def tokenizer_fingerprint(tokenizer) -> dict:
    vocab = sorted(tokenizer.get_vocab().items())
    template = getattr(tokenizer, "chat_template", None) or ""
    return {
        "vocab_sha256": hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest(),
        "vocab_size": len(vocab),
        "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest(),
        "eos_token": tokenizer.eos_token,
        "pad_token_id": tokenizer.pad_token_id,
    }


def teacher_fingerprint(path: str | Path) -> dict:
    """The teacher checkpoint's identity: a hash over its files (large ones sampled, see the module doc)."""
    root = Path(path) if is_hf_llava_dir(path) else resolve_checkpoint(path, "teacher.checkpoint")
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0" + _sha256_file(f, sampled=True).encode())
    return {"sha256": h.hexdigest(), "path": str(root.resolve())}


def expected_record(
    cfg, tokenizer, num_visual_tokens: int, image_token_id: int, vocab_size: int, images
) -> dict:
    """What a cache must have been built for to serve stage ``cfg`` (compared field by field)."""
    template = ConversationEncoder(tokenizer, cfg.data.template, num_visual_tokens, image_token_id).template
    record = {
        "data": data_fingerprint(cfg.data),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": cfg.data.max_length,
        "template": template,
        "system_prompt": cfg.data.system_prompt,
        "num_visual_tokens": num_visual_tokens,
        "image_token_id": image_token_id,
        "vocab_size": vocab_size,
        "image_processor": {"size": images.size, "mean": list(images.mean), "std": list(images.std)},
        "k": cfg.teacher.cache_topk,
        "relation_rank": cfg.teacher.cache_relation_rank,
        "teacher_quantize": cfg.teacher.quantize,
    }
    if cfg.loss.cross_tokenizer:  # rows at the teacher's own positions; its template follows data.template
        record.update(cross_tokenizer=True, teacher_template_setting=cfg.data.template)
    return record


_FIELD_NAMES = {
    "data.sha256": "data file (SHA-256 of data.path)",
    "data.format": "data.format",
    "data.shards": "number of data shards",
    "data.max_samples": "data.max_samples",
    "tokenizer.vocab_sha256": "tokenizer vocabulary",
    "tokenizer.vocab_size": "tokenizer vocabulary size",
    "tokenizer.chat_template_sha256": "tokenizer chat template",
    "tokenizer.eos_token": "tokenizer EOS token",
    "tokenizer.pad_token_id": "tokenizer pad token",
    "max_length": "data.max_length",
    "template": "data.template (resolved)",
    "system_prompt": "data.system_prompt",
    "num_visual_tokens": "visual tokens per image",
    "image_token_id": "<image> token id",
    "vocab_size": "LM-head vocabulary size",
    "image_processor.size": "image size",
    "image_processor.mean": "image mean",
    "image_processor.std": "image std",
    "k": "k (teacher.cache_topk)",
    "relation_rank": "teacher.cache_relation_rank",
    "teacher_quantize": "teacher.quantize",
    "cross_tokenizer": "loss.cross_tokenizer",
    "teacher_template_setting": "data.template of the teacher's encoding (loss.cross_tokenizer)",
}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def record_differences(built: dict, expected: dict) -> list[str]:
    """Human-readable differences between a cache's record and what a stage needs."""
    a, b = _flatten(built), _flatten(expected)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key == "data.max_samples" and a.get(key) is None:
            continue  # a cache of the whole data set serves any subset
        if a.get(key) != b.get(key):
            what = _FIELD_NAMES.get(key, key)
            va, vb = a.get(key), b.get(key)
            if isinstance(va, str) and len(va) == 64 and isinstance(vb, str):  # hashes: shorten
                va, vb = va[:12] + "...", vb[:12] + "..."
            diffs.append(f"{what}: cache {va!r}, this stage {vb!r}")
    return diffs
