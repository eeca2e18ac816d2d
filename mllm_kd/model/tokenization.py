"""Tokenizers: loading, the `<image>` placeholder token, and training a small byte-level BPE.

A real pretrained tokenizer (a local directory, e.g. SmolLM2's or Qwen's) is the normal case. For data
sets without one (the smoke recipe, the easy-VQA demo) :func:`train_bpe_tokenizer` trains a byte-level
BPE on the training text with the `tokenizers` library and gives it a ChatML chat template, so the
pipeline exercises the same chat-template code path as with Qwen or SmolLM2.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mllm_kd.data.records import IMAGE_TOKEN
from mllm_kd.errors import ConfigError

# ChatML, as used by Qwen and SmolLM2. Our BPE tokenizers get it so that they behave like those models.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN)


def load_tokenizer(path: str | Path, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory and make sure it has a pad token and ``<image>``."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"tokenizer directory {path} does not exist (model.tokenizer)")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(str(path), **kwargs)
    return prepare_tokenizer(tok)


def prepare_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add ``<image>`` as a special token (if absent) and a pad token (the EOS token if absent)."""
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def image_token_id(tok: PreTrainedTokenizerBase) -> int:
    return tok.convert_tokens_to_ids(IMAGE_TOKEN)


def train_bpe_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024) -> Path:
    """Train a byte-level BPE tokenizer with a ChatML template and save it with ``save_pretrained``.

    The EOS token is ``<|im_end|>`` (the end of an assistant turn), the pad token ``<|endoftext|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir
