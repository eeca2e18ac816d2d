"""The stage's objective on one micro-batch, on the loss path the run plan chose."""

from __future__ import annotations

import logging

import torch
from torch import nn

from mllm_kd.config import StageConfig
from mllm_kd.errors import TrainingError
from mllm_kd.losses.cached import cached_distill_loss, cached_distill_loss_reference
from mllm_kd.losses.fused import fused_distill_loss
from mllm_kd.losses.head import head_gram
from mllm_kd.losses.reference import (
    DistillSettings,
    causal_lm_loss,
    distill_terms,
    hidden_layer_pairs,
    hidden_state_distill,
    response_mask,
    teacher_right,
    visual_embedding_distill,
)
from mllm_kd.model.multimodal import MultimodalLM
from mllm_kd.runtime.distributed import unwrap
from mllm_kd.runtime.plan import RunPlan
from mllm_kd.teacher.cache import CachedTeacher, check_loss_settings
from mllm_kd.train.cross_objective import CrossTokenizerObjective

log = logging.getLogger(__name__)

# Text-config fields of models whose logits are not plain ``lm_head(hidden)``.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class LossComputer:
    """The stage's objective on one micro-batch: CE (+ distillation terms against a frozen teacher).

    ``loss.fused`` (default): the student and teacher run without their LM heads and every term comes from
    the final hidden states and the head weights (:func:`mllm_kd.losses.fused.fused_distill_loss`), a
    ``loss.chunk_size`` of positions at a time, so no ``[B, T, V]`` logits exist. Heads the fused path
    cannot reproduce exactly (see :func:`fusable_head`), and ``loss.fused=false``, use the logits reference
    (:func:`~mllm_kd.losses.reference.causal_lm_loss` + :func:`~mllm_kd.losses.reference.distill_terms`).
    Which of the two is decided once, on the first batch (the heads do not change during a run).

    A :class:`~mllm_kd.teacher.cache.CachedTeacher` as ``teacher`` (``teacher.cache``): no teacher runs; its
    stored outputs for the batch's samples (``batch["ids"]``) are looked up and the terms are those of
    :func:`~mllm_kd.losses.cached.cached_distill_loss` (fused) or
    :func:`~mllm_kd.losses.cached.cached_distill_loss_reference` (``loss.fused=false``).

    ``loss.w_emb`` adds, on either path, the distillation of the projected images
    (:func:`~mllm_kd.losses.reference.visual_embedding_distill`, the term ``vemb``), from the projected
    visual tokens both forwards return anyway, or the teacher's as its cache keeps them
    (``teacher.cache_projected_images``; a cache without them is refused when it is opened).

    ``loss.w_hidden`` adds, likewise, intermediate-layer distillation
    (:func:`~mllm_kd.losses.reference.hidden_state_distill`, the term ``hidden``): both forwards then also
    return every layer's hidden states, paired by :func:`~mllm_kd.losses.reference.hidden_layer_pairs` with the
    student's ``model.llm.keep_layers`` (decided on the first batch, when both depths are known).

    ``loss.resp_where_teacher_right`` narrows MDist_resp to the answer tokens the online teacher predicts
    right (:func:`~mllm_kd.losses.reference.teacher_right`): the teacher's argmax at the response positions,
    from its logits (reference) or its hidden states there times its head (fused, a few rows per sample).
    """

    def __init__(
        self,
        cfg: StageConfig,
        teacher: MultimodalLM | CachedTeacher | None,
        plan: RunPlan | None = None,
        shared_vocab: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        self.loss = cfg.loss
        self.fused = plan.fused if plan is not None else cfg.loss.fused
        self.cache = teacher if isinstance(teacher, CachedTeacher) else None
        self.teacher = None if self.cache is not None else teacher
        if plan is not None and plan.teacher != (
            "none" if teacher is None else "cache" if self.cache else "model"
        ):
            raise TrainingError(
                f"the run plan's teacher is {plan.teacher!r}, the loss was given {type(teacher).__name__}"
            )
        if self.cache is not None:
            check_loss_settings(cfg)
        self.where_right = cfg.loss.resp_where_teacher_right and cfg.loss.w_resp > 0 and teacher is not None
        if self.where_right and (self.cache is not None or cfg.loss.cross_tokenizer):
            raise TrainingError(
                "loss.resp_where_teacher_right needs the teacher model itself with the student's tokenizer: "
                "not teacher.cache (top-k only) and not loss.cross_tokenizer; set it false"
            )
        self.settings = DistillSettings(
            kind=cfg.loss.kind,
            temperature=cfg.loss.temperature,
            beta=cfg.loss.beta,
            alpha=cfg.loss.alpha,
            resp=cfg.loss.w_resp > 0,
            vis=cfg.loss.w_vis > 0,
            rel=cfg.loss.w_rel > 0,
        )
        self.weights = {
            "ce": cfg.loss.w_ce,
            "mdist_resp": cfg.loss.w_resp,
            "mdist_vis": cfg.loss.w_vis,
            "rdist": cfg.loss.w_rel,
        }
        self.w_emb = cfg.loss.w_emb if teacher is not None else 0.0
        self.w_hidden = cfg.loss.w_hidden if self.teacher is not None else 0.0
        self.keep_layers = cfg.model.llm.keep_layers
        self._pairs: list[tuple[int, int]] | None = None  # loss.w_hidden's layer map, on the first batch
        if cfg.loss.fused and cfg.loss.chunk_size < 1:
            raise TrainingError(f"loss.chunk_size must be >= 1, got {cfg.loss.chunk_size}")
        self._teacher_gram: tuple[tuple, torch.Tensor] | None = None  # (weight identity, W^T W) cache
        self._heads: tuple[nn.Linear, nn.Linear | None] | None = None  # the fused path's heads, once chosen
        self._path: str | None = None  # "fused" or "reference", decided on the first batch
        self.cross = None  # loss.cross_tokenizer, a teacher model or its cache: train/cross_objective.py
        if cfg.loss.cross_tokenizer and teacher is not None:
            self.cross = CrossTokenizerObjective(
                cfg, teacher, self.settings, self.weights, shared_vocab, fusable_head
            )

    def _choose_path(self, student: nn.Module) -> str:
        if self._path is None:
            self._path = "reference"
            if self.fused:
                head = fusable_head(student)
                t_head = None if self.teacher is None else fusable_head(self.teacher)
                if head is not None and (self.teacher is None or t_head is not None):
                    self._path, self._heads = "fused", (head, t_head)
                else:
                    log.info(
                        "loss.fused: an LM head is not a plain, whole nn.Linear; using the logits reference"
                    )
        return self._path

    def __call__(self, student: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the weighted total and each unweighted term (float32 scalars).

        On the fused path the terms are detached values (for logging); only the total carries gradients.
        A batch with ``on_policy`` True (the student's own responses, mllm_kd/train/on_policy.py) has no CE
        term, and ``on_policy`` is reported as a term (1 or 0) whenever the batch says.
        """
        if self.cross is not None:
            return self.cross(student, batch)
        if self._choose_path(student) == "fused":
            head, t_head = self._heads
            if self.cache is not None:
                total, terms = self._cached(student, batch, head)
            else:
                total, terms = self._fused(student, batch, head, t_head)
        elif self.cache is not None:
            total, terms = self._cached(student, batch, None)
        else:
            total, terms = self._reference(student, batch)
        if "on_policy" in batch:
            terms["on_policy"] = torch.tensor(float(batch["on_policy"]))
        return total, terms

    def _cached(
        self, student: nn.Module, batch: dict, head: nn.Linear | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective against the cached teacher; ``head`` None: from the student's full logits."""
        inner = unwrap(student)
        ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        vis_mask = ids == inner.image_token_id
        rows = response_mask(labels) | vis_mask
        cached = self.cache.lookup(batch["ids"], ids, attn, labels, rows, ids.device)
        if head is None:
            out = student(ids, attn, batch["pixel_values"])
            total, terms = cached_distill_loss_reference(
                out.logits, labels, vis_mask, inner.num_visual_tokens, cached, self.weights, self.settings
            )
            return self._with_vemb(total, terms, out.visual, cached.visual)
        out = student(ids, attn, batch["pixel_values"], return_logits=False)
        total, terms = cached_distill_loss(
            out.hidden,
            _head_weight(out, head),
            labels,
            vis_mask,
            inner.num_visual_tokens,
            cached,
            self.weights,
            self.settings,
            chunk_size=self.loss.chunk_size,
            head_bias=head.bias,
        )
        return self._with_vemb(total, terms, out.visual, cached.visual)

    def _reference(self, student: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        layers = self._layers_kw()
        out = student(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], **layers)
        terms = {} if batch.get("on_policy") else {"ce": causal_lm_loss(out.logits, batch["labels"])}
        t_out, keep = None, None
        if self.teacher is not None:
            inner = unwrap(student)
            with torch.no_grad():
                t_out = self.teacher(
                    batch["input_ids"], batch["attention_mask"], batch["pixel_values"], **layers
                )
            vis_mask = batch["input_ids"] == inner.image_token_id
            keep = teacher_right(t_out.logits.argmax(-1), batch["labels"]) if self.where_right else None
            terms.update(
                distill_terms(
                    out.logits,
                    t_out.logits,
                    batch["labels"],
                    vis_mask,
                    inner.num_visual_tokens,
                    self.settings,
                    resp_keep=keep,
                )
            )
        total = sum(self.weights[k] * v for k, v in terms.items() if self.weights[k] != 0)
        if t_out is not None and keep is not None:
            terms["teacher_right"] = _share(keep, batch["labels"])
        return self._with_features(total, terms, out, t_out, batch["attention_mask"])

    def _layers_kw(self) -> dict:
        """The forwards' keyword asking for every layer's hidden states, when ``loss.w_hidden`` needs them."""
        return {"return_layers": True} if self.w_hidden > 0 else {}

    def _with_features(
        self, total, terms: dict, out, t_out, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``total`` and ``terms`` with the ``hidden`` and ``vemb`` terms added where ``loss.w_hidden`` and
        ``loss.w_emb`` ask for them."""
        if self.w_hidden > 0 and t_out is not None:
            if self._pairs is None:
                try:
                    self._pairs = hidden_layer_pairs(
                        len(out.layers) - 1, len(t_out.layers) - 1, self.keep_layers
                    )
                except ValueError as e:
                    raise TrainingError(f"loss.w_hidden with model.llm.keep_layers: {e}") from e
            try:
                hidden = hidden_state_distill(out.layers, t_out.layers, self._pairs, attention_mask.bool())
            except ValueError as e:
                raise TrainingError(
                    f"loss.w_hidden: {e}; distilling hidden states needs a student of the teacher's width "
                    "(set loss.w_hidden=0)"
                ) from e
            terms["hidden"] = hidden.detach()
            total = total + self.w_hidden * hidden
        return self._with_vemb(total, terms, out.visual, None if t_out is None else t_out.visual)

    def _with_vemb(
        self, total, terms: dict, visual: torch.Tensor | None, teacher_visual: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``total`` and ``terms`` with the ``vemb`` term added where ``loss.w_emb`` asks for it: the student's
        projected images ``visual`` against the teacher's (its forward's or its cache's)."""
        if self.w_emb == 0 or visual is None or teacher_visual is None:
            return total, terms
        try:
            vemb = visual_embedding_distill(visual, teacher_visual)
        except ValueError as e:  # another shape: another embedding space
            raise TrainingError(
                f"loss.w_emb: the student projects each image to {tuple(visual.shape[1:])} (visual tokens, "
                f"LLM width), the teacher to {tuple(teacher_visual.shape[1:])}; distilling the projected "
                "images needs one embedding space (a student cut from the teacher's LLM): set loss.w_emb=0"
            ) from e
        terms["vemb"] = vemb.detach()
        return total + self.w_emb * vemb, terms

    def _fused(
        self, student: nn.Module, batch: dict, head: nn.Linear, t_head: nn.Linear | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids, attn, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
        layers = self._layers_kw()
        out = student(ids, attn, pixels, return_logits=False, **layers)
        teacher_kw, t_out = {}, None
        if self.teacher is not None and t_head is not None:
            inner = unwrap(student)
            with torch.no_grad():
                t_out = self.teacher(ids, attn, pixels, return_logits=False, **layers)
            teacher_kw = {
                "teacher_hidden": t_out.hidden,
                "teacher_head_weight": t_head.weight,
                "teacher_bias": t_head.bias,
                "vis_mask": ids == inner.image_token_id,
                "num_visual_tokens": inner.num_visual_tokens,
                "teacher_gram": self._cached_teacher_gram(t_head) if self.settings.rel else None,
            }
            if self.where_right:
                teacher_kw["resp_keep"] = _teacher_right_fused(t_out.hidden, t_head, batch["labels"])
        total, terms = fused_distill_loss(
            out.hidden,
            _head_weight(out, head),
            batch["labels"],
            self.weights,
            settings=self.settings,
            chunk_size=self.loss.chunk_size,
            student_bias=head.bias,
            with_ce=not batch.get("on_policy", False),
            **teacher_kw,
        )
        if "resp_keep" in teacher_kw:
            terms["teacher_right"] = _share(teacher_kw["resp_keep"], batch["labels"])
        return self._with_features(total, terms, out, t_out, attn)

    def _cached_teacher_gram(self, t_head: nn.Linear) -> torch.Tensor:
        """The frozen teacher's ``W^T W`` for RDist, recomputed only when its head weights change."""
        w, b = t_head.weight, t_head.bias
        key = (w.data_ptr(), w._version, w.dtype, w.device, None if b is None else (b.data_ptr(), b._version))
        if self._teacher_gram is None or self._teacher_gram[0] != key:
            with torch.no_grad():
                self._teacher_gram = (key, head_gram(w.detach(), None if b is None else b.detach()))
        return self._teacher_gram[1]


def _share(keep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The share of the response positions in ``keep`` (logged as ``teacher_right``)."""
    return keep.sum().float() / response_mask(labels).sum().clamp_min(1)


def _teacher_right_fused(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor) -> torch.Tensor:
    """:func:`teacher_right` from the teacher's final hidden states: its head applied at the response rows only."""
    resp = response_mask(labels)
    top = torch.full_like(labels, -1)
    with torch.no_grad():
        top[resp] = head(hidden[resp].to(head.weight.dtype)).argmax(-1)
    return teacher_right(top, labels)


def _head_weight(out, head: nn.Linear) -> torch.Tensor:
    """The head weight the forward handed back (a tied embedding's alias: one gradient buffer), else the head's."""
    return head.weight if out.head_weight is None else out.head_weight


def fusable_head(model: nn.Module) -> nn.Linear | None:
    """The LM head of a :class:`~mllm_kd.model.multimodal.MultimodalLM` (or of a DDP wrapper of one) when the fused
    losses reproduce its logits exactly, else None (the caller then uses the logits reference).

    That is: the logits are ``head(hidden)`` for a plain ``nn.Linear`` head (bias allowed) with no hooks,
    not post-processed (soft-capping, logit scaling), and the weights are whole tensors (FSDP2 shards them
    outside the module's own forward).
    """
    inner = unwrap(model)
    if not isinstance(inner, MultimodalLM) or type(inner).forward is not MultimodalLM.forward:
        return None
    head = inner.llm.get_output_embeddings()
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None
    if any(type(p) is not nn.Parameter and type(p) is not torch.Tensor for p in head.parameters()):
        return None  # e.g. a DTensor (FSDP2-sharded)
    text_cfg = inner.llm.config.get_text_config()
    for name in _LOGIT_POSTPROCESSING:
        value = getattr(text_cfg, name, None)
        if value is not None and value != 1:
            return None
    return head
