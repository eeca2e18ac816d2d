"""Generated responses in a distillation stage: on-policy distillation (GKD) and sequence-level KD.

GKD (Agarwal et al., 2024; TRL's ``GKDTrainer``) trains the student on its own samples, scored by the
teacher, for a share ``lambda`` of the batches; sequence-level KD (TRL's ``seq_kd``) on the teacher's.
:class:`ResponseSource` rewrites a micro-batch before the loss sees it:

* ``loss.on_policy_fraction`` (``lmbda``): the micro-batch is on-policy with that probability. The
  student samples a response for each sample's image and prompt (``generation.temperature``,
  ``generation.max_new_tokens``); it replaces the data set's, the teacher scores it in the loss's usual
  forward pass and MDist_resp is computed at its positions. The batch carries ``on_policy=True``: the
  loss leaves CE out (GKD trains student samples on the divergence alone). The image positions do not
  change, so MDist_vis and RDist apply as on any batch.
* ``loss.sequence_kd`` (``seq_kd``): every other micro-batch takes the teacher's response (sampled at the
  same temperature, or greedy with ``generation.teacher_greedy``) and trains CE + MDist on it. TRL
  generates it before drawing lambda; here it is skipped when the student's sample would replace it.

The prompt is everything before a sample's last supervised span (its last answer, as TRL's chat collator
splits prompt and completion); earlier answers stay in the prompt, unsupervised. The response is
supervised up to and including its stop token (EOS or the end-of-turn token).

Randomness is derived, not carried: whether micro-batch ``k`` of optimizer step ``s`` is on-policy
depends on ``(train.seed, s, k)`` only (the same on every rank, so ranks generate together), and the
draws of a generation on ``(train.seed, s, k, rank)``. A resumed run reproduces both from the step count.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from mllm_kd.config import StageConfig
from mllm_kd.errors import ConfigError
from mllm_kd.losses.reference import IGNORE_INDEX
from mllm_kd.model.generate import sample_tokens, stop_token_ids
from mllm_kd.model.multimodal import MultimodalLM
from mllm_kd.runtime.distributed import is_sharded

_CHOICE, _STUDENT, _TEACHER = 0, 1, 2  # which random stream a derived seed is for


def derived_seed(*parts: int) -> int:
    """A 63-bit seed mixing ``parts`` (numpy's SeedSequence: nearby tuples give unrelated streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def prompt_lengths(labels: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
    """Per row of a right-padded batch, where its last supervised span starts (the whole row when none).

    Args:
        labels: ``[B, T]`` unshifted, -100 outside answers; attention_mask: ``[B, T]``.
    """
    out = []
    for lab, att in zip(labels, attention_mask):
        sup = (lab != IGNORE_INDEX).nonzero().flatten()
        if len(sup) == 0:
            out.append(int(att.sum()))
            continue
        start = int(sup[-1])
        while start > 0 and lab[start - 1] != IGNORE_INDEX:
            start -= 1
        out.append(start)
    return out


def with_responses(batch: dict, prompt_lens: list[int], responses: list[torch.Tensor], pad_id: int) -> dict:
    """The batch with each sample's prompt (its first ``prompt_lens[b]`` ids) followed by ``responses[b]``,
    right-padded; labels are the response ids only. Images, sample ids and other keys are kept."""
    ids = batch["input_ids"]
    rows = [torch.cat([ids[b, :n].cpu(), r.cpu()]) for b, (n, r) in enumerate(zip(prompt_lens, responses))]
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, (row, n) in enumerate(zip(rows, prompt_lens)):
        input_ids[b, : len(row)], attention_mask[b, : len(row)] = row, 1
        labels[b, n : len(row)] = row[n:]
    device = ids.device
    return {
        **batch,
        "input_ids": input_ids.to(device),
        "labels": labels.to(device),
        "attention_mask": attention_mask.to(device),
    }


@contextlib.contextmanager
def _generating(model: nn.Module):
    """Eval mode (no dropout) and, for an FSDP2-sharded model, its root parameters gathered."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    sharded = is_sharded(model)
    if sharded:
        model.unshard()
    try:
        yield
    finally:
        if sharded:
            model.reshard()
        for m, mode in modes:
            m.training = mode


class ResponseSource:
    """Replaces a micro-batch's responses with generated ones (see the module docstring)."""

    def __init__(
        self, cfg: StageConfig, student: MultimodalLM, teacher: MultimodalLM, tokenizer, rank: int = 0
    ):
        self.fraction, self.seq_kd = cfg.loss.on_policy_fraction, cfg.loss.sequence_kd
        self.gen, self.seed, self.rank = cfg.generation, cfg.train.seed, rank
        self.student, self.teacher = student, teacher
        self.stop, self.pad = stop_token_ids(tokenizer), tokenizer.pad_token_id

    @classmethod
    def from_config(
        cls, cfg: StageConfig, student: MultimodalLM, teacher: object, tokenizer, rank: int = 0
    ) -> ResponseSource | None:
        """None when the stage trains on the data set's responses only (the default)."""
        if cfg.loss.on_policy_fraction == 0 and not cfg.loss.sequence_kd:
            return None
        if not isinstance(teacher, MultimodalLM):
            raise ConfigError(
                f"{cfg.stage}: loss.on_policy_fraction / loss.sequence_kd need a teacher model to score or write "
                "the responses (teacher.checkpoint, in a distillation stage)"
            )
        if cfg.loss.on_policy_fraction > 0 and not (cfg.loss.distills and cfg.loss.w_resp > 0):
            raise ConfigError(
                f"{cfg.stage}: loss.on_policy_fraction > 0 trains on-policy batches on MDist_resp only (no CE); "
                f"set loss.w_resp > 0 (got {cfg.loss.w_resp})"
            )
        return cls(cfg, student, teacher, tokenizer, rank)

    def is_on_policy(self, step: int, micro: int) -> bool:
        """Whether micro-batch ``micro`` of optimizer step ``step`` is on-policy (the same on every rank)."""
        if self.fraction <= 0:
            return False
        if self.fraction >= 1:
            return True
        g = torch.Generator().manual_seed(derived_seed(self.seed, step, micro, _CHOICE))
        return bool(torch.rand((), generator=g) < self.fraction)

    def __call__(self, batch: dict, step: int, micro: int) -> dict:
        """The micro-batch to train on at ``(step, micro)``; ``batch["on_policy"]`` says whose response it is."""
        on_policy = self.is_on_policy(step, micro)
        if not on_policy and not self.seq_kd:
            return {**batch, "on_policy": False}
        model, stream = (self.student, _STUDENT) if on_policy else (self.teacher, _TEACHER)
        greedy = not on_policy and self.gen.teacher_greedy
        prompt_lens = prompt_lengths(batch["labels"], batch["attention_mask"])
        prompts = [batch["input_ids"][b, :n] for b, n in enumerate(prompt_lens)]
        device = model.llm.get_input_embeddings().weight.device
        g = torch.Generator(device=device).manual_seed(
            derived_seed(self.seed, step, micro, self.rank, stream)
        )
        with _generating(model):
            responses = sample_tokens(
                model,
                prompts,
                batch["pixel_values"],
                self.gen.max_new_tokens,
                self.stop,
                self.pad,
                temperature=self.gen.temperature,
                generator=g,
                greedy=greedy,
                fixed_length=is_sharded(model),
            )
        return {**with_responses(batch, prompt_lens, responses, self.pad), "on_policy": on_policy}
