"""The losses of LLaVA-KD: the logits-level references and their chunked fast paths.

* :mod:`~mllm_kd.losses.reference` — pure functions of logits and masks (MDist, RDist, CE; and the
  distillation of the projected images and of the hidden states, which need no logits); the definitions every fast path is tested
  against. Re-exported here.
* :mod:`~mllm_kd.losses.head` / :mod:`~mllm_kd.losses.kernel` — the LM head's part and the one chunked
  loop shared by the two fast paths below.
* :mod:`~mllm_kd.losses.online` + :mod:`~mllm_kd.losses.fused` — against an online teacher.
* :mod:`~mllm_kd.losses.cached` — against a cached teacher's top-k outputs.
"""

from mllm_kd.losses.reference import (
    IGNORE_INDEX,
    KD_KINDS,
    DistillSettings,
    causal_lm_loss,
    distill_terms,
    divergence_from_logprobs,
    hidden_layer_pairs,
    hidden_state_distill,
    kd_divergence,
    relation_distill,
    relation_loss_from_gram,
    response_mask,
    visual_embedding_distill,
)

__all__ = [
    "IGNORE_INDEX",
    "KD_KINDS",
    "DistillSettings",
    "causal_lm_loss",
    "distill_terms",
    "divergence_from_logprobs",
    "hidden_layer_pairs",
    "hidden_state_distill",
    "kd_divergence",
    "relation_distill",
    "relation_loss_from_gram",
    "response_mask",
    "visual_embedding_distill",
]
