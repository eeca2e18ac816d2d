"""Building a teacher cache for ``loss.cross_tokenizer`` (a teacher with another tokenizer and visual grid).

:func:`mllm_kd.teacher.build.build_teacher_cache` uses :class:`CrossCache` in place of the same-vocabulary
row function when ``loss.cross_tokenizer`` is set. Each sample is encoded for both models and aligned
(:func:`mllm_kd.data.cross_tokens.with_teacher_encoding`, as the online stage does); the teacher runs on its
own encoding, and what the cross-tokenizer terms read from it is stored (:mod:`mllm_kd.teacher.cache_format`):

* per aligned response position, the teacher's row *at its own position*: top-k log-probabilities, the
  indices mapped to the student ids of the shared tokens (the student's vocabulary size for a token the
  student does not have), ``log p_rest`` and its shared part, and the student position it is compared at;
* per image, the teacher's visual hidden states pooled to the smaller grid
  (:func:`mllm_kd.losses.cross_tokenizer.pool_visual`): the same for each pooled position, and the relation
  matrix of the pooled rows (RDist), as the same-vocabulary cache stores it;
* once, the student ids of the shared tokens.

The loss that reads it is :mod:`mllm_kd.losses.cached_cross`. Training from such a cache needs only the
student's encoding: the alignment is stored.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mllm_kd.data.cross_tokens import TeacherSkipped, with_teacher_encoding
from mllm_kd.data.datasets import TrainData
from mllm_kd.data.encoding import SampleSkipped
from mllm_kd.errors import ConfigError
from mllm_kd.losses.cross_tokenizer import pool_visual
from mllm_kd.losses.head import relation_matrix
from mllm_kd.losses.reference import response_mask
from mllm_kd.model.multimodal import MultimodalLM
from mllm_kd.teacher.cache_format import CROSS_FILES, relation_values, sample_hash, teacher_topk
from mllm_kd.teacher.fingerprint import tokenizer_fingerprint
from mllm_kd.teacher.load import load_teacher_preprocessing


class CrossCache:
    """The data (both encodings), collate function and row function of a cross-tokenizer cache.

    ``data``: the stage's student data; ``student``, ``teacher``: the models (the teacher on any device).
    """

    def __init__(self, cfg, data: TrainData, tokenizer, student: MultimodalLM, teacher: MultimodalLM):
        if cfg.teacher.cache_topk > teacher.vocab_size:
            raise ConfigError(
                f"teacher.cache_topk={cfg.teacher.cache_topk} is larger than the teacher's vocabulary "
                f"({teacher.vocab_size})"
            )
        t_tok, t_images = load_teacher_preprocessing(cfg, teacher)
        self.data = with_teacher_encoding(
            data, cfg.data, tokenizer, teacher, t_tok, t_images, student.vocab_size
        )
        shared_s, shared_t = self.data.shared_vocab
        self.student_vocab = student.vocab_size
        self.shared_s = shared_s
        self.to_student = torch.full((teacher.vocab_size,), student.vocab_size, dtype=torch.long)
        self.to_student[shared_t] = shared_s
        self.shared_t = torch.zeros(teacher.vocab_size, dtype=torch.bool)
        self.shared_t[shared_t] = True
        self.n_pool = min(student.num_visual_tokens, teacher.num_visual_tokens)
        self.student_resp = 0  # the student's response positions, aligned or not
        self.teacher_skipped: list[str] = []  # ids of samples only the teacher's encoding skipped
        self.layout = {
            "visual_rows_per_image": self.n_pool,
            "student_vocab_size": student.vocab_size,
            "student_visual_tokens": student.num_visual_tokens,
            "teacher_vocab_size": teacher.vocab_size,
            "teacher_visual_tokens": teacher.num_visual_tokens,
            "teacher_tokenizer": tokenizer_fingerprint(t_tok),
            "shared_tokens": len(shared_s),
            "indices": f"student ids; {student.vocab_size}: a token the student does not have",
        }

    @property
    def collate(self):
        return self.data.collate

    def skipped(self, item: SampleSkipped) -> None:
        """Note a skipped sample: one that only the teacher's encoding skipped is listed in the manifest, and
        a stage trained from the cache drops it too (:meth:`mllm_kd.teacher.cache.CachedTeacher.without_skipped`)."""
        if isinstance(item, TeacherSkipped):
            self.teacher_skipped.append(item.sample_id)

    @torch.no_grad()
    def rows(
        self, teacher: nn.Module, batch: dict, k: int, rank: int, gram: torch.Tensor, chunk_size: int = 256
    ) -> list[dict]:
        """Run the teacher on one two-tokenizer batch; per sample, what the cache stores (numpy arrays:
        the aligned response rows in student-position order, then the pooled visual rows image by image)."""
        t_ids = batch["teacher_input_ids"]
        hidden = teacher(
            t_ids, batch["teacher_attention_mask"], batch["teacher_pixel_values"], return_logits=False
        ).hidden
        head = teacher.llm.get_output_embeddings()
        w, b = head.weight, head.bias
        vis = t_ids == teacher.image_token_id
        n_t = teacher.num_visual_tokens
        img_counts = (vis.sum(1) // n_t).tolist()
        align_s, align_t = batch["align_student"].to(t_ids.device), batch["align_teacher"].to(t_ids.device)
        parts, positions = [], []
        for bi in range(t_ids.shape[0]):
            keep = align_s[bi] >= 0
            parts.append(hidden[bi, align_t[bi][keep]])
            positions.append(align_s[bi][keep].cpu())
        pooled = None
        if vis.any():
            pooled = pool_visual(hidden[vis].view(-1, n_t, hidden.shape[-1]), self.n_pool)
            parts.append(pooled.reshape(-1, hidden.shape[-1]))
        shared = self.shared_t.to(w.device)
        logp, idx, rest, rest_shared = teacher_topk(torch.cat(parts), w, b, k, chunk_size, shared)
        idx = self.to_student[idx]
        rels = None
        if pooled is not None:
            with torch.autocast(t_ids.device.type, enabled=False):
                rels = relation_matrix(pooled, gram, b is not None).cpu()
        labels = batch["labels"]
        ids_cpu, labels_cpu = batch["input_ids"].cpu().numpy(), labels.cpu().numpy()
        lengths = batch["attention_mask"].sum(1).tolist()
        n_resp = response_mask(labels).sum(1).tolist()
        out, r0, v0, m0 = [], 0, sum(len(p) for p in positions), 0
        for bi, sid in enumerate(batch["ids"]):
            a, m = len(positions[bi]), int(img_counts[bi])
            v = m * self.n_pool
            rows = np.r_[np.arange(r0, r0 + a), np.arange(v0, v0 + v)]
            rel_vals = [relation_values(rels[m0 + j], rank) for j in range(m)]
            pos = np.r_[positions[bi].numpy(), np.full(v, -1)]
            out.append(
                {
                    "id": str(sid),
                    "hash": sample_hash(ids_cpu[bi, : lengths[bi]], labels_cpu[bi, : lengths[bi]]),
                    "logprobs": logp[rows].numpy(),
                    "indices": idx[rows].numpy(),
                    "rest": rest[rows].numpy().astype(np.float32),
                    "rest_shared": rest_shared[rows].numpy().astype(np.float32),
                    "positions": pos.astype(np.int32),
                    "relation": torch.cat(rel_vals).numpy() if rel_vals else np.zeros(0, np.float16),
                    "n_images": m,
                    "n_resp": a,
                }
            )
            self.student_resp += int(n_resp[bi])
            r0, v0, m0 = r0 + a, v0 + v, m0 + m
        return out

    def finish(self, directory, response_rows: int) -> dict:
        """Write the shared student ids into ``directory``; the manifest layout's ``cross_tokenizer`` entry."""
        path = directory / CROSS_FILES["shared"]
        path.write_bytes(self.shared_s.numpy().astype(np.int32).tobytes())
        return {
            **self.layout,
            "aligned_fraction": response_rows / max(self.student_resp, 1),
            "teacher_skipped": self.teacher_skipped,
            "shared_file": CROSS_FILES["shared"],
        }
