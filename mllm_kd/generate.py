"""Batched greedy generation for evaluation: left padding, KV cache (transformers' ``generate``).

The prompt embeddings (text + projected image features) are built by :meth:`MultimodalLM.embed` and
handed to the LLM's own ``generate`` as ``inputs_embeds``, so caching, position ids under left padding
and stopping are transformers' well-tested code. Generation stops at EOS or the chat template's
end-of-turn token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mllm_kd.data import ConversationEncoder, ImageProcessor
from mllm_kd.model import MultimodalLM


@dataclass
class Generator:
    """Answers prompts (each with at most its ``<image>`` placeholders' images) with greedy decoding."""

    model: MultimodalLM
    tokenizer: object
    encoder: ConversationEncoder
    images: ImageProcessor
    max_new_tokens: int = 16

    @classmethod
    def from_model(cls, model: MultimodalLM, tokenizer, template: str = "auto", system_prompt: str | None = None,
                   image_mean=None, image_std=None, max_new_tokens: int = 16) -> Generator:
        encoder = ConversationEncoder(tokenizer, template, model.num_visual_tokens, model.image_token_id, system_prompt)
        mean = image_mean or [0.48145466, 0.4578275, 0.40821073]
        std = image_std or [0.26862954, 0.26130258, 0.27577711]
        return cls(model, tokenizer, encoder, ImageProcessor(model.vision.image_size, list(mean), list(std)), max_new_tokens)

    def stop_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end, int) and end != self.tokenizer.unk_token_id:
            ids.add(end)
        return sorted(i for i in ids if i is not None)

    @torch.no_grad()
    def __call__(self, prompts: list[str], pixel_values: list[torch.Tensor | None]) -> list[str]:
        """Greedy answers.

        Args:
            prompts: user messages with ``<image>`` placeholders.
            pixel_values: per prompt, ``[n_images, 3, H, W]`` (or None for text-only prompts).
        """
        model, tok = self.model, self.tokenizer
        device = next(model.parameters()).device
        ids = [self.encoder.prompt_ids(p) for p in prompts]
        T = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), T), tok.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), T), dtype=torch.long)
        for b, x in enumerate(ids):  # left padding: every prompt ends where generation starts
            input_ids[b, T - len(x) :] = torch.tensor(x)
            attention_mask[b, T - len(x) :] = 1
        images = [p for p in pixel_values if p is not None]
        pixels = torch.cat(images).to(device) if images else None
        model.eval()
        embeds = model.embed(input_ids.to(device), pixels)
        out = model.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask.to(device),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            eos_token_id=self.stop_ids(),
            pad_token_id=tok.pad_token_id,
        )
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]
