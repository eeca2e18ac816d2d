"""A record -> token ids, labels and pixel values: images and conversation templates.

Templates (``data.template``):

* ``chat``: the tokenizer's chat template (``human`` -> ``user``, ``gpt`` -> ``assistant``). Labels cover
  each assistant message and the template's end-of-turn tokens after it.
* ``plain`` (for tokenizers without a chat template)::

      [{system}\n\n]USER: {human}\nASSISTANT: {gpt}{eos}\nUSER: {human}\nASSISTANT: {gpt}{eos}\n...

  Labels cover ``{gpt}{eos}``.
* ``caption`` (stage-1 pre-training, LLaVA's "plain" pre-training format): the image tokens, then the
  caption (the first ``gpt`` turn) and EOS; the human instruction is dropped. Labels cover caption+EOS.
* ``auto``: ``chat`` when the tokenizer has a chat template, else ``plain``.

Every ``<image>`` becomes ``num_visual_tokens`` copies of the ``<image>`` token id; labels there are -100.
A sample longer than ``data.max_length`` is never cut through its visual tokens: it is skipped and
reported, or refused (``data.on_overflow``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mllm_kd.config import DataConfig
from mllm_kd.data.records import open_image
from mllm_kd.errors import DataError
from mllm_kd.losses import IGNORE_INDEX
from mllm_kd.model.tokenization import IMAGE_TOKEN


# ------------------------------------------------------------------------------------------- images
@dataclass
class ImageProcessor:
    """RGB, resize to a square ``size`` (bicubic), scale to [0, 1], normalise per channel."""

    size: int
    mean: list[float]
    std: list[float]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> ``[3, size, size]`` float32."""
        image = image.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)

    def load(self, source: str | Path | bytes, where: str) -> torch.Tensor:
        """An image file or its bytes -> ``[3, size, size]``; an unreadable image is a :class:`DataError`."""
        with open_image(source, where) as im:
            try:
                return self(im)
            except (OSError, SyntaxError) as e:  # truncated data shows up when the pixels are decoded
                raise DataError(f"{where}: cannot read image: {e}") from e


# -------------------------------------------------------------------------------------- tokenization
class ConversationEncoder:
    """Turns a validated conversation into ``input_ids`` and ``labels`` (see the module docstring)."""

    def __init__(
        self,
        tokenizer,
        template: str,
        num_visual_tokens: int,
        image_token_id: int,
        system_prompt: str | None = None,
    ):
        if template == "auto":
            template = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise DataError("data.template=chat but the tokenizer has no chat template (use plain)")
        self.tok = tokenizer
        self.template = template
        self.n_vis = num_visual_tokens
        self.image_id = image_token_id
        self.system_prompt = system_prompt

    def _ids(self, text: str) -> list[int]:
        ids: list[int] = []
        for k, piece in enumerate(text.split(IMAGE_TOKEN)):
            if k > 0:
                ids += [self.image_id] * self.n_vis
            if piece:
                ids += self.tok(piece, add_special_tokens=False)["input_ids"]
        return ids

    def segments(self, conv: list[dict]) -> list[tuple[str, bool]]:
        """``(text, is_label)`` pieces whose concatenation is the rendered conversation."""
        if self.template == "caption":
            images = IMAGE_TOKEN * sum(t["value"].count(IMAGE_TOKEN) for t in conv)
            return [(images, False), (conv[1]["value"].strip() + self.tok.eos_token, True)]
        if self.template == "plain":
            out = [(self.system_prompt + "\n\n", False)] if self.system_prompt else []
            for human, gpt in zip(conv[::2], conv[1::2]):
                out += [
                    (f"USER: {human['value']}\nASSISTANT: ", False),
                    (gpt["value"] + self.tok.eos_token, True),
                    ("\n", False),
                ]
            return out
        messages = (
            [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        )
        out, prev = [], ""
        for turn in conv:
            if turn["from"] == "human":
                messages.append({"role": "user", "content": turn["value"]})
                continue
            prompt = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            messages.append({"role": "assistant", "content": turn["value"]})
            full = self.tok.apply_chat_template(messages, tokenize=False)
            if not (prompt.startswith(prev) and full.startswith(prompt)):
                raise DataError(
                    "the tokenizer's chat template does not render conversations as growing prefixes, so answer "
                    "spans cannot be located; use data.template=plain"
                )
            out += [(prompt[len(prev) :], False), (full[len(prompt) :], True)]
            prev = full
        return out

    def _bos(self) -> list[int]:
        """The BOS the plain templates start with, when the tokenizer adds one (chat templates render it)."""
        if self.template in ("plain", "caption") and getattr(self.tok, "add_bos_token", False):
            return [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        return []

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of a one-turn prompt ending where the assistant's answer starts (for generation)."""
        if self.template == "caption":
            return self._bos() + self._ids(IMAGE_TOKEN * question.count(IMAGE_TOKEN))
        if self.template == "plain":
            system = self.system_prompt + "\n\n" if self.system_prompt else ""
            return self._bos() + self._ids(f"{system}USER: {question}\nASSISTANT: ")
        messages = (
            [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        )
        messages.append({"role": "user", "content": question})
        return self._ids(self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def __call__(self, conv: list[dict]) -> tuple[list[int], list[int]]:
        ids = self._bos()
        labels = [IGNORE_INDEX] * len(ids)
        for text, is_label in self.segments(conv):
            piece = self._ids(text)
            ids += piece
            labels += piece if is_label else [IGNORE_INDEX] * len(piece)
        return ids, labels


# ------------------------------------------------------------------------------------------ datasets
class SampleSkipped(Exception):
    """A sample that :class:`Collator` drops (too long, or unreadable with ``on_error=skip``)."""


def encode_sample(
    rec: dict, images: list[torch.Tensor], encoder: ConversationEncoder, cfg: DataConfig, where: str
) -> dict:
    sid = str(rec.get("id", where))
    ids, labels = encoder(rec["conversations"])
    if len(ids) > cfg.max_length:
        msg = f"{where}: sample {sid!r} needs {len(ids)} tokens (with {len(images)} x {encoder.n_vis} visual) > data.max_length={cfg.max_length}"
        if cfg.on_overflow == "raise":
            raise DataError(msg)
        raise SampleSkipped(msg)
    return {
        "id": sid,
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "pixel_values": torch.stack(images) if images else None,
    }
