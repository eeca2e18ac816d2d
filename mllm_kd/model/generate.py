"""Batched generation: greedy answers for evaluation, and sampled token ids for training.

* :class:`Generator` (evaluation): the prompt embeddings (text + projected image features) are built by
  :meth:`MultimodalLM.embed` and handed to the LLM's own ``generate`` as ``inputs_embeds``, so caching,
  position ids under padding and stopping are transformers' well-tested code. The tokens every prompt of a
  batch starts with (the chat template's system turn and user header, up to the first image) run once and
  enter ``generate`` as its KV cache (:func:`shared_prefix`): 8 of the ~39 prompt tokens of the easy-VQA demo.
* :func:`sample_tokens` (on-policy distillation, sequence-level KD): the same left-padded prompt and KV
  cache, decoded here because sampling must draw from a caller's seeded ``torch.Generator`` (reproducible
  and resumable whatever else uses the global RNG), and because sharded models must run the same number
  of forward passes on every rank (``fixed_length``).

Generation stops at EOS or the chat template's end-of-turn token (:func:`stop_token_ids`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import torch
from tqdm.auto import tqdm

from mllm_kd.data.encoding import ConversationEncoder, ImageProcessor
from mllm_kd.data.records import image_prompt
from mllm_kd.errors import DataError
from mllm_kd.model.multimodal import MultimodalLM
from mllm_kd.runtime.work import chunk_bounds

T = TypeVar("T")


@dataclass
class Generator:
    """Answers prompts (each with at most its ``<image>`` placeholders' images) with greedy decoding."""

    model: MultimodalLM
    tokenizer: object
    encoder: ConversationEncoder
    images: ImageProcessor
    max_new_tokens: int = 16
    prefix_cache: bool = True  # run the batch's shared prompt prefix once (shared_prefix)

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
        return stop_token_ids(self.tokenizer)

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
        P = shared_prefix(ids, model.image_token_id) if self.prefix_cache else 0
        if P and not within_attention_window(model.llm, max(len(x) for x in ids) + self.max_new_tokens):
            P = 0  # the padding after the prefix would take places in a sliding window
        T = max(len(x) for x in ids) - P
        # [shared prefix][left padding][the rest]: every prompt ends where generation starts; the position ids
        # transformers derives from the attention mask skip the padding
        input_ids = torch.full((len(ids), P + T), tok.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), P + T), dtype=torch.long)
        for b, x in enumerate(ids):
            start = P + T - (len(x) - P)
            input_ids[b, :P], input_ids[b, start:] = torch.tensor(x[:P]), torch.tensor(x[P:])
            attention_mask[b, :P], attention_mask[b, start:] = 1, 1
        images = [p for p in pixel_values if p is not None]
        pixels = torch.cat(images).to(device) if images else None
        model.eval()
        embeds = model.embed(input_ids.to(device), pixels)
        cache = {}
        if P:  # the prefix's keys and values, computed once and repeated for the batch
            out = model.llm(inputs_embeds=embeds[:1, :P], use_cache=True, logits_to_keep=1)
            cache = _kv_cache(out)
            next(iter(cache.values())).batch_repeat_interleave(len(ids))
        out = model.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask.to(device),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            eos_token_id=self.stop_ids(),
            pad_token_id=tok.pad_token_id,
            **cache,
        )
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


def shared_prefix(ids: list[list[int]], image_token_id: int) -> int:
    """How many leading tokens every prompt of ``ids`` shares, up to its first image token (an image's features
    differ by prompt) and leaving each prompt at least one token of its own; 0 for a single prompt."""
    if len(ids) < 2:
        return 0
    n = 0
    shortest = min(len(x) for x in ids)
    while n < shortest - 1 and ids[0][n] != image_token_id and all(x[n] == ids[0][n] for x in ids):
        n += 1
    return n


def within_attention_window(llm, length: int) -> bool:
    """Whether every token of a ``length``-token sequence attends to all those before it: no sliding-window
    attention layer (Gemma 3's, Mistral's, Qwen2's with ``use_sliding_window``) or a window of at least
    ``length``. (Padding inside the sequence, as after a shared prefix, would take places in the window.)"""
    cfg = llm.config.get_text_config() if hasattr(llm.config, "get_text_config") else llm.config
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        return True
    types = getattr(cfg, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return True
    return int(window) >= length


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and the ChatML end-of-turn token ``<|im_end|>`` when the tokenizer has one."""
    ids = {tokenizer.eos_token_id}
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        ids.add(end)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def sample_tokens(
    model: MultimodalLM,
    prompts: list[torch.Tensor],
    pixel_values: torch.Tensor | None,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    greedy: bool = False,
    fixed_length: bool = False,
) -> list[torch.Tensor]:
    """Continue each prompt by sampling from ``softmax(logits / temperature)`` (or greedily), with a KV cache.

    Args:
        prompts: per sample, its ``[T_b]`` token ids (``num_visual_tokens`` ``<image>`` ids per image).
        pixel_values: ``[N_images, 3, H, W]`` in the order the images appear in ``prompts`` (or None).
        stop_ids: a sample's response ends with the first of these it produces.
        generator: the source of randomness of the draws (on the model's device).
        fixed_length: run ``max_new_tokens`` forward passes even when every sample has stopped (ranks of a
            sharded model must all run the same collectives).
    Returns:
        per sample, the ``[n_b]`` generated ids, the stop token included when one was produced
        (``1 <= n_b <= max_new_tokens``); never the ``<image>`` id.
    """
    device = model.llm.get_input_embeddings().weight.device
    T = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), T), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((len(prompts), T), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        input_ids[b, T - len(p) :] = p.to(device)
        attn[b, T - len(p) :] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    out = model.llm(
        inputs_embeds=model.embed(input_ids, pixel_values),
        attention_mask=attn,
        position_ids=pos,
        use_cache=True,
        logits_to_keep=1,
    )
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    steps = []
    for i in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        logits[:, model.image_token_id] = -float("inf")  # only the data pipeline places image tokens
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        steps.append(torch.where(done, pad_id, nxt))
        done = done | torch.isin(nxt, stop)
        if i + 1 == max_new_tokens or (not fixed_length and bool(done.all())):
            break
        attn = torch.cat([attn, attn.new_ones(len(prompts), 1)], dim=1)
        pos = pos[:, -1:] + 1
        out = model.llm(
            input_ids=steps[-1][:, None],
            attention_mask=attn,
            position_ids=pos,
            **_kv_cache(out),
            use_cache=True,
            logits_to_keep=1,
        )
    tokens = torch.stack(steps, dim=1).cpu()
    result = []
    for row in tokens:
        hits = torch.isin(row, stop.cpu()).nonzero()
        result.append(row[: int(hits[0]) + 1] if len(hits) else row)
    return result


def _kv_cache(out) -> dict:
    """The KV cache of a forward's output as the next forward's keyword (``cache`` in recent transformers,
    ``past_key_values`` before)."""
    if getattr(out, "cache", None) is not None:
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


def alike_batches(items: list[T], batch_size: int, key: Callable[[T], Any]) -> list[list[T]]:
    """``items`` in batches of at most ``batch_size``, stably sorted by ``key`` first.

    Greedy decoding runs until the batch's longest answer ends and pads every prompt to its longest one, so
    questions alike (one question type, similar prompt length) answered together cost less: one-word
    answers stop after two steps instead of running as long as the described ones mixed in with them
    (easy-VQA's 3,000 test questions: 14-22% less time, the same answers). Only a batch at the boundary of
    two keys mixes them. Answer files are read by question id (``mllm_kd.eval``'s by question id, round and
    prompt), so their line order does not matter.
    """
    order = sorted(items, key=key)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def question_kind(q: dict) -> tuple[str, int]:
    """A LLaVA question's batching key: its ``category`` (when the file has one) and its prompt's length."""
    return str(q.get("category", "")), len(q["text"])


def answer_batches(
    generator: Generator,
    items: list[T],
    f: IO[str],
    *,
    batch_size: int,
    key: Callable[[T], Any],
    text: Callable[[T], str],
    pixels: Callable[[T], torch.Tensor | None],
    row: Callable[[T, str, str], dict],
    bar=None,
    workers: int = 4,
) -> None:
    """The one answering loop (the demo's scoring, ``python -m mllm_kd.eval run``, the teacher's answers to a
    transfer set): ``items`` in :func:`alike_batches` by ``key``; each batch's images (``pixels``: ``[1, 3, H,
    W]`` or None for a text-only question) decoded on ``workers`` threads while the batch before it generates;
    the prompt is ``text`` with ``<image>\\n`` before it where there is an image (unless the text places it);
    ``row(item, prompt, answer)`` is appended to ``f`` as a JSON line, flushed after every batch."""
    from concurrent.futures import ThreadPoolExecutor

    batches = alike_batches(items, batch_size, key)
    with ThreadPoolExecutor(max(1, workers)) as pool:

        def prepare(batch: list[T]) -> list:
            return [pool.submit(pixels, item) for item in batch]

        upcoming = prepare(batches[0]) if batches else []
        for b, batch in enumerate(batches):
            current, upcoming = upcoming, (prepare(batches[b + 1]) if b + 1 < len(batches) else [])
            images = [fut.result() for fut in current]
            prompts = [text(it) if px is None else image_prompt(text(it)) for it, px in zip(batch, images)]
            answers = generator(prompts, images)
            f.writelines(json.dumps(row(it, p, a)) + "\n" for it, p, a in zip(batch, prompts, answers))
            f.flush()
            if bar is not None:
                bar.update(len(batch))


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

    Questions are answered in :func:`alike_batches`, sorted by ``category`` and prompt length, so the file's
    lines follow that order, not the questions'.

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

    def pixels(q: dict) -> torch.Tensor | None:
        if not q.get("image"):
            return None
        return generator.images.load(folder / q["image"], f"question {q['question_id']}")[None]

    def row(q: dict, prompt: str, text: str) -> dict:
        return {
            "question_id": q["question_id"],
            "prompt": prompt,
            "text": text,
            "answer_id": uuid.uuid4().hex,
            "model_id": model_id,
            "metadata": {},
        }

    with (
        open(out, "a") as f,
        tqdm(total=len(todo), desc=f"answering ({model_id})", disable=not progress) as bar,
    ):
        answer_batches(
            generator,
            todo,
            f,
            batch_size=batch_size,
            key=question_kind,
            text=lambda q: q["text"],
            pixels=pixels,
            row=row,
            bar=bar,
        )
    return out
