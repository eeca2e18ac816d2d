"""Batched greedy generation for evaluation: left padding, KV cache (transformers' ``generate``).

The prompt embeddings (text + projected image features) are built by :meth:`MultimodalLM.embed` and
handed to the LLM's own ``generate`` as ``inputs_embeds``, so caching, position ids under left padding
and stopping are transformers' well-tested code. Generation stops at EOS or the chat template's
end-of-turn token.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mllm_kd.data.encoding import ConversationEncoder, ImageProcessor
from mllm_kd.errors import DataError
from mllm_kd.model.multimodal import MultimodalLM
from mllm_kd.model.tokenization import IMAGE_TOKEN
from mllm_kd.runtime.work import chunk_bounds


@dataclass
class Generator:
    """Answers prompts (each with at most its ``<image>`` placeholders' images) with greedy decoding."""

    model: MultimodalLM
    tokenizer: object
    encoder: ConversationEncoder
    images: ImageProcessor
    max_new_tokens: int = 16

    @classmethod
    def from_model(
        cls,
        model: MultimodalLM,
        tokenizer,
        template: str = "auto",
        system_prompt: str | None = None,
        image_mean=None,
        image_std=None,
        max_new_tokens: int = 16,
    ) -> Generator:
        encoder = ConversationEncoder(
            tokenizer, template, model.num_visual_tokens, model.image_token_id, system_prompt
        )
        mean = image_mean or [0.48145466, 0.4578275, 0.40821073]
        std = image_std or [0.26862954, 0.26130258, 0.27577711]
        return cls(
            model,
            tokenizer,
            encoder,
            ImageProcessor(model.vision.image_size, list(mean), list(std)),
            max_new_tokens,
        )

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


def read_questions(path: str | Path) -> list[dict]:
    """A LLaVA question file (JSONL of ``question_id``, ``image``, ``text``); errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"question file {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON: {e}") from e
        if not isinstance(q, dict) or "question_id" not in q or not isinstance(q.get("text"), str):
            raise DataError(f"{path}:{n}: a question needs 'question_id' and 'text'")
        out.append(q)
    return out


def answer_file(
    generator: Generator,
    questions: list[dict],
    image_folder: str | Path,
    out: str | Path,
    model_id: str,
    batch_size: int = 64,
    chunk: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> Path:
    """Answer LLaVA questions into a LLaVA answer file, appending line by line and resuming a partial one.

    Args:
        questions: records with ``question_id``, ``text`` and optionally ``image`` (relative to
            ``image_folder``); ``<image>\\n`` is put before the text of questions with an image, as LLaVA does.
        chunk: ``(index, count)``: answer only contiguous chunk ``index`` of ``count`` of the questions
            (:func:`mllm_kd.runtime.work.chunk_bounds`, as ``mllm_kd.eval`` splits them).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():  # resume: keep complete lines, drop a torn last line
        lines = out.read_text().splitlines(keepends=True)
        good = []
        for line in lines:
            try:
                done.add(str(json.loads(line)["question_id"]))
                good.append(line)
            except (json.JSONDecodeError, KeyError):
                break
        if len(good) < len(lines) or (good and not good[-1].endswith("\n")):  # only a torn file is rewritten
            out.write_text("".join(line if line.endswith("\n") else line + "\n" for line in good))
    lo, hi = chunk_bounds(len(questions), *chunk)
    todo = [q for q in questions[lo:hi] if str(q["question_id"]) not in done]
    folder = Path(image_folder)
    with (
        open(out, "a") as f,
        tqdm(total=len(todo), desc=f"answering ({model_id})", disable=not progress) as bar,
    ):
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            prompts, pixels = [], []
            for q in batch:
                if q.get("image"):
                    prompts.append(f"{IMAGE_TOKEN}\n{q['text']}")
                    pixels.append(
                        generator.images.load(folder / q["image"], f"question {q['question_id']}")[None]
                    )
                else:
                    prompts.append(q["text"])
                    pixels.append(None)
            for q, prompt, text in zip(batch, prompts, generator(prompts, pixels)):
                row = {
                    "question_id": q["question_id"],
                    "prompt": prompt,
                    "text": text,
                    "answer_id": uuid.uuid4().hex,
                    "model_id": model_id,
                    "metadata": {},
                }
                f.write(json.dumps(row) + "\n")
            f.flush()
            bar.update(len(batch))
    return out
