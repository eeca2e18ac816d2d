"""Two-tokenizer batches for ``loss.cross_tokenizer``: each sample encoded for the student and for the
teacher, the response positions of the two encodings aligned, and the tokens both vocabularies share.

Alignment rule (by character offsets of the answer text): every token of an assistant answer gets the
key ``(answer number, character offset where the token starts, relative to the answer text)``; the
end-of-turn token right after the answer gets the key of the answer's end. A student position ``t``
(whose next-token distribution predicts student token ``t + 1``) is aligned with the teacher position
``k - 1`` when the teacher token ``k`` has the same key as student token ``t + 1``: both models then have
read exactly the same answer text so far and predict what starts at the same character. Student response
positions whose next token starts inside a teacher token (and template tokens around the answer) are
*unaligned*: they keep their cross-entropy and get no MDist_resp.

Shared vocabulary (:func:`shared_vocabulary`): token ids whose strings are equal once decoded to text
(byte-level BPE pieces through the GPT-2 byte table, SentencePiece ``▁`` as a space, ``<0xNN>`` byte
pieces as that byte); added tokens by their literal content. A heuristic, as in TRL's GOLD.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch.utils.data import Dataset

from mllm_kd.config import DataConfig
from mllm_kd.data.datasets import Collator, LlavaJsonDataset, TrainData
from mllm_kd.data.encoding import ConversationEncoder, ImageProcessor, SampleSkipped, encode_sample
from mllm_kd.data.records import record_images
from mllm_kd.errors import ConfigError, DataError
from mllm_kd.losses import IGNORE_INDEX
from mllm_kd.model.tokenization import IMAGE_TOKEN

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (answer number, character offset in that answer)


# ----------------------------------------------------------------------------------------- alignment
def answer_keys(encoder: ConversationEncoder, conv: list[dict]) -> list[Key | None]:
    """The key of every token of ``encoder(conv)``'s ids (None outside the answers), see the module doc.

    Raises :class:`DataError` if the tokenizer is not a fast one (no character offsets).
    """
    answers = [t["value"].strip() for t in conv if t["from"] == "gpt"]
    keys: list[Key | None] = [None] * len(encoder._bos())
    turn = -1
    for text, is_label in encoder.segments(conv):
        n = len(encoder._ids(text))  # exactly the ids the encoder produced for this piece
        if not is_label:
            keys += [None] * n
            continue
        turn += 1
        content = answers[turn] if turn < len(answers) else ""
        start = text.find(content) if content else -1
        if IMAGE_TOKEN in text or start < 0:
            keys += [None] * n
            continue
        if not getattr(encoder.tok, "is_fast", False):
            raise DataError("loss.cross_tokenizer needs fast tokenizers (character offsets) for both models")
        enc = encoder.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) != n:
            keys += [None] * n
            continue
        seen: set[int] = set()
        for a, _ in enc["offset_mapping"]:
            rel = a - start
            # Only the first token starting at a character gets its key (byte pieces of one character).
            keys.append((turn, rel) if 0 <= rel <= len(content) and rel not in seen else None)
            seen.add(rel)
    return keys


def align_positions(
    student_keys: list[Key | None], student_labels: list[int], teacher_keys: list[Key | None]
) -> tuple[list[int], list[int]]:
    """``(student positions, teacher positions)`` whose next-token distributions are compared (module doc).

    Only student tokens that are supervised (label not -100) are aligned.
    """
    first: dict[Key, int] = {}
    for k, key in enumerate(teacher_keys):
        if key is not None:
            first.setdefault(key, k)
    s_pos, t_pos = [], []
    for j, key in enumerate(student_keys):
        if j == 0 or key is None or student_labels[j] == IGNORE_INDEX:
            continue
        k = first.get(key)
        if k is not None and k > 0:
            s_pos.append(j - 1)
            t_pos.append(k - 1)
    return s_pos, t_pos


# ---------------------------------------------------------------------------------- shared vocabulary
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode`` (how byte-level BPE writes bytes as characters)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_texts(tokenizer) -> dict[int, str]:
    """Token id -> the text it stands for (module doc); ids whose text is not whole UTF-8 are left out."""
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and isinstance(backend.decoder, decoders.ByteLevel)
    table = _byte_decoder() if byte_level else None
    added = {tok.content for tok in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    out: dict[int, str] = {}
    for piece, i in tokenizer.get_vocab().items():
        if piece in added:
            out[i] = piece
            continue
        try:
            if table is not None:
                out[i] = bytes(table[c] for c in piece).decode("utf-8")
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out[i] = bytes([int(piece[3:5], 16)]).decode("utf-8")
            else:
                out[i] = piece.replace("▁", " ")
        except (KeyError, UnicodeDecodeError, ValueError):
            continue
    return out


def shared_vocabulary(
    student_tok, teacher_tok, student_size: int, teacher_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(student ids [S], teacher ids [S])`` of the tokens with the same text in both vocabularies, one
    pair per text (the lowest id of each side), ids below the heads' widths."""
    s_by_text: dict[str, int] = {}
    for i, text in sorted(token_texts(student_tok).items()):
        if i < student_size:
            s_by_text.setdefault(text, i)
    t_by_text: dict[str, int] = {}
    for i, text in sorted(token_texts(teacher_tok).items()):
        if i < teacher_size:
            t_by_text.setdefault(text, i)
    pairs = sorted((s, t_by_text[text]) for text, s in s_by_text.items() if text in t_by_text)
    s_ids = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    t_ids = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return s_ids, t_ids


# ------------------------------------------------------------------------------------------ data
class TeacherSkipped(SampleSkipped):
    """A sample whose student encoding is fine but whose teacher encoding is skipped (``sample_id``)."""

    def __init__(self, message: str, sample_id: str):
        super().__init__(message)
        self.sample_id = sample_id


class TeacherEncodedDataset(Dataset):
    """A :class:`LlavaJsonDataset` whose samples also hold the teacher's encoding and the alignment.

    Extra keys: ``teacher_input_ids [T_t]``, ``teacher_pixel_values`` (the images through the teacher's own
    preprocessing), ``align_student`` / ``align_teacher`` ``[A]`` (positions, see :func:`align_positions`).
    A sample too long for the teacher follows ``data.on_overflow`` like one too long for the student.
    """

    def __init__(
        self, base: LlavaJsonDataset, teacher_encoder: ConversationEncoder, teacher_images: ImageProcessor
    ):
        self.base, self.encoder, self.images = base, teacher_encoder, teacher_images

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict | SampleSkipped:
        item = self.base[i]
        if isinstance(item, SampleSkipped):
            return item
        rec, cfg = self.base.records[i], self.base.cfg
        where = f"{cfg.path} sample {rec.get('id')!r} (teacher)"
        folder = self.base.folder
        try:
            pixels = [self.images.load(folder / n, f"{where} image {folder / n}") for n in record_images(rec)]
            t = encode_sample(rec, pixels, self.encoder, cfg, f"{cfg.path} (teacher tokenizer)")
            s_keys = answer_keys(self.base.encoder, rec["conversations"])
            t_keys = answer_keys(self.encoder, rec["conversations"])
        except SampleSkipped as e:
            return TeacherSkipped(str(e), item["id"])
        except DataError as e:
            if cfg.on_error == "raise":
                raise
            return TeacherSkipped(str(e), item["id"])
        s_pos, t_pos = align_positions(s_keys, item["labels"].tolist(), t_keys)
        item.update(
            teacher_input_ids=t["input_ids"],
            teacher_pixel_values=t["pixel_values"],
            align_student=torch.tensor(s_pos, dtype=torch.long),
            align_teacher=torch.tensor(t_pos, dtype=torch.long),
        )
        return item


@dataclass
class TwoTokenizerCollator:
    """Pads the student's fields (:class:`Collator`), the teacher's (``teacher_input_ids``,
    ``teacher_attention_mask``, ``teacher_pixel_values``) and the alignment ``align_student`` /
    ``align_teacher`` ``[B, A]`` (-1 where there is none)."""

    pad_token_id: int
    teacher_pad_token_id: int

    def __call__(self, items: list[dict | SampleSkipped]) -> dict:
        batch = Collator(self.pad_token_id)(items)
        kept = [x for x in items if not isinstance(x, SampleSkipped)]
        if not kept:
            return batch
        teacher = Collator(self.teacher_pad_token_id)(
            [
                {
                    "id": x["id"],
                    "input_ids": x["teacher_input_ids"],
                    "labels": torch.full_like(x["teacher_input_ids"], IGNORE_INDEX),
                    "pixel_values": x["teacher_pixel_values"],
                }
                for x in kept
            ]
        )
        width = max(1, max(len(x["align_student"]) for x in kept))
        align_s = torch.full((len(kept), width), -1, dtype=torch.long)
        align_t = torch.full((len(kept), width), -1, dtype=torch.long)
        for b, x in enumerate(kept):
            n = len(x["align_student"])
            align_s[b, :n], align_t[b, :n] = x["align_student"], x["align_teacher"]
        batch.update(
            teacher_input_ids=teacher["input_ids"],
            teacher_attention_mask=teacher["attention_mask"],
            teacher_pixel_values=teacher["pixel_values"],
            align_student=align_s,
            align_teacher=align_t,
        )
        return batch


class WithoutSamples(Dataset):
    """``base`` whose samples ``skip`` (ids) are :class:`TeacherSkipped`: a stage trained from a
    cross-tokenizer cache drops the samples whose teacher encoding was skipped when the cache was built, as
    the online stage drops them."""

    def __init__(self, base: Dataset, skip: set[str], why: str):
        self.base, self.skip, self.why = base, skip, why

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict | SampleSkipped:
        item = self.base[i]
        if isinstance(item, SampleSkipped) or item["id"] not in self.skip:
            return item
        return TeacherSkipped(f"sample {item['id']!r}: {self.why}", item["id"])


def with_teacher_encoding(
    data: TrainData,
    cfg: DataConfig,
    student_tok,
    teacher,
    teacher_tok,
    teacher_images: ImageProcessor,
    student_vocab: int,
) -> TrainData:
    """``data`` whose batches also hold the teacher's encoding (``loss.cross_tokenizer``), with the
    collate function and the shared vocabulary the cross-tokenizer loss needs."""
    if not isinstance(data.dataset, LlavaJsonDataset):
        raise ConfigError(
            "loss.cross_tokenizer needs data.format=llava_json (WebDataset shards are not supported)"
        )
    encoder = ConversationEncoder(
        teacher_tok, cfg.template, teacher.num_visual_tokens, teacher.image_token_id, cfg.system_prompt
    )
    shared = shared_vocabulary(student_tok, teacher_tok, student_vocab, teacher.vocab_size)
    log.info(
        "loss.cross_tokenizer: %d tokens shared by the student's (%d) and the teacher's (%d) vocabularies",
        len(shared[0]),
        student_vocab,
        teacher.vocab_size,
    )
    collate: Callable = TwoTokenizerCollator(student_tok.pad_token_id, teacher_tok.pad_token_id)
    return replace(
        data,
        dataset=TeacherEncodedDataset(data.dataset, encoder, teacher_images),
        collate=collate,
        shared_vocab=shared,
    )
