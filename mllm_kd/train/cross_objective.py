"""The stage's objective against a teacher with another tokenizer (``loss.cross_tokenizer``).

The batch holds both encodings (:mod:`mllm_kd.data.cross_tokens`); the student and the teacher run without
their LM heads on their own ids and images, and :func:`mllm_kd.losses.cross_tokenizer.cross_tokenizer_loss`
computes CE + MDist_resp + MDist_vis + RDist from the hidden states and the two heads, chunked. With a
cached teacher (``teacher.cache``, built for the pair) the batch is the student's alone: the cache holds the
alignment and the teacher's rows, and :func:`mllm_kd.losses.cached_cross.cached_cross_tokenizer_loss`
computes the same terms from them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mllm_kd.config import StageConfig
from mllm_kd.errors import CompatibilityError, ConfigError
from mllm_kd.losses.cached_cross import cached_cross_tokenizer_loss
from mllm_kd.losses.cross_tokenizer import cross_tokenizer_loss
from mllm_kd.losses.head import head_gram
from mllm_kd.losses.reference import DistillSettings
from mllm_kd.model.multimodal import MultimodalLM
from mllm_kd.runtime.distributed import unwrap
from mllm_kd.teacher.cache import CachedTeacher


class CrossTokenizerObjective:
    """``(total, terms)`` of one two-tokenizer micro-batch (both LM heads checked on every call), against
    the teacher model or its cross-tokenizer cache."""

    def __init__(
        self,
        cfg: StageConfig,
        teacher: MultimodalLM | CachedTeacher,
        settings: DistillSettings,
        weights: dict[str, float],
        shared_vocab: tuple[torch.Tensor, torch.Tensor] | None,
        head_of: Callable[[nn.Module], nn.Linear | None],
    ):
        self.cache = teacher if isinstance(teacher, CachedTeacher) else None
        if self.cache is not None and not self.cache.cross:
            raise ConfigError(
                f"loss.cross_tokenizer: the teacher cache {self.cache.directory} was built without "
                "loss.cross_tokenizer=true; rebuild it with the option (python -m mllm_kd.cache_teacher ... "
                "loss.cross_tokenizer=true teacher.cache=DIR)"
            )
        if shared_vocab is None and self.cache is None:
            raise ConfigError(
                "loss.cross_tokenizer: the data carry no teacher encoding (build them with "
                "mllm_kd.data.cross_tokens.with_teacher_encoding)"
            )
        self.teacher, self.settings, self.weights = teacher, settings, weights
        self.shared = shared_vocab
        self.chunk_size = cfg.loss.chunk_size
        self.head_of = head_of  # objective.fusable_head: the plain nn.Linear head, or None
        self._gram: torch.Tensor | None = None  # the frozen teacher's W^T W (RDist)

    def _heads(self, student: nn.Module) -> tuple[nn.Linear, nn.Linear]:
        head, t_head = self.head_of(student), self.head_of(self.teacher)
        if head is None or t_head is None:
            raise CompatibilityError(
                "loss.cross_tokenizer computes the losses from hidden states and LM-head weights; it needs both "
                "LM heads to be plain, whole nn.Linear layers without logit soft-capping or scaling"
            )
        return head, t_head

    def __call__(self, student: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.cache is not None:
            return self._cached(student, batch)
        head, t_head = self._heads(student)
        inner = unwrap(student)
        ids = batch["input_ids"]
        hidden = student(ids, batch["attention_mask"], batch["pixel_values"], return_logits=False).hidden
        t_ids = batch["teacher_input_ids"]
        with torch.no_grad():
            t_hidden = self.teacher(
                t_ids, batch["teacher_attention_mask"], batch["teacher_pixel_values"], return_logits=False
            ).hidden
        if self.settings.rel and self._gram is None:
            with torch.no_grad():
                w, b = t_head.weight.detach(), None if t_head.bias is None else t_head.bias.detach()
                self._gram = head_gram(w, b)
        return cross_tokenizer_loss(
            hidden,
            head.weight,
            batch["labels"],
            self.weights,
            t_hidden,
            t_head.weight,
            batch["align_student"],
            batch["align_teacher"],
            self.shared,
            self.settings,
            vis_mask=ids == inner.image_token_id,
            teacher_vis_mask=t_ids == self.teacher.image_token_id,
            num_visual_tokens=inner.num_visual_tokens,
            teacher_visual_tokens=self.teacher.num_visual_tokens,
            chunk_size=self.chunk_size,
            student_bias=head.bias,
            teacher_bias=t_head.bias,
            teacher_gram=self._gram,
        )

    def _cached(self, student: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        head = self.head_of(student)
        if head is None:
            raise CompatibilityError(
                "loss.cross_tokenizer computes the losses from hidden states and the LM-head weights; it needs "
                "the student's LM head to be a plain, whole nn.Linear layer without logit soft-capping or scaling"
            )
        inner = unwrap(student)
        ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        cached = self.cache.lookup(batch["ids"], ids, attn, labels, None, ids.device)
        hidden = student(ids, attn, batch["pixel_values"], return_logits=False).hidden
        return cached_cross_tokenizer_loss(
            hidden,
            head.weight,
            labels,
            self.weights,
            cached,
            self.settings,
            vis_mask=ids == inner.image_token_id,
            num_visual_tokens=inner.num_visual_tokens,
            chunk_size=self.chunk_size,
            head_bias=head.bias,
        )
