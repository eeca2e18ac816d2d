"""loss.cross_tokenizer: alignment by character offsets, the cross-vocabulary divergence against a float64
reference, the chunked objective against plain autograd, visual pooling, the refusals, and stages 1-3
with a teacher whose tokenizer and visual-token count differ from the student's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from mllm_kd.data.cross_tokens import align_positions, answer_keys, shared_vocabulary
from mllm_kd.data.encoding import ConversationEncoder
from mllm_kd.errors import CompatibilityError, ConfigError
from mllm_kd.losses.cross_tokenizer import cross_tokenizer_loss, cross_vocab_divergence, pool_visual
from mllm_kd.losses.reference import (
    DistillSettings,
    divergence_from_logprobs,
    relation_distill,
    response_mask,
)
from mllm_kd.model.tokenization import image_token_id, load_tokenizer, train_bpe_tokenizer
from mllm_kd.recipe import resolve_stage_config


# ------------------------------------------------------------------------------------------ alignment
@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """A character-level byte BPE (no merges) and one that merged the words 'red' and ' circle'."""
    root = tmp_path_factory.mktemp("toks")
    chars = load_tokenizer(train_bpe_tokenizer(["x"], root / "chars", vocab_size=260))
    words = load_tokenizer(train_bpe_tokenizer(["red circle"] * 50, root / "words", vocab_size=300))
    return chars, words


def test_alignment_by_character_offsets(two_tokenizers):
    chars, words = two_tokenizers
    conv = [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "red circle"}]
    s_enc = ConversationEncoder(chars, "chat", 4, image_token_id(chars))
    t_enc = ConversationEncoder(words, "chat", 4, image_token_id(words))
    s_ids, s_labels = s_enc(conv)
    t_ids, t_labels = t_enc(conv)
    s_pos, t_pos = align_positions(answer_keys(s_enc, conv), s_labels, answer_keys(t_enc, conv))
    # The student reads one character per token, the teacher "red", " circle": the aligned next tokens are
    # those starting at characters 0, 3 and 10 (the end-of-turn token after the answer).
    s_next = [chars.convert_ids_to_tokens(s_ids[p + 1]) for p in s_pos]
    t_next = [words.convert_ids_to_tokens(t_ids[p + 1]) for p in t_pos]
    assert s_next == ["r", "Ġ", "<|im_end|>"]
    assert t_next == ["red", "Ġcircle", "<|im_end|>"]
    # Both models have read the same answer text before each aligned position.
    s_first = next(i for i, label in enumerate(s_labels) if label != -100)
    t_first = next(i for i, label in enumerate(t_labels) if label != -100)
    for sp, tp in zip(s_pos, t_pos):
        assert chars.decode(s_ids[s_first : sp + 1]) == words.decode(t_ids[t_first : tp + 1])
    # 10 answer characters + end-of-turn + "\n" are supervised for the student; 3 of them are aligned.
    assert sum(label != -100 for label in s_labels) == 12


def test_align_positions_on_hand_made_keys():
    s_keys = [None, (0, 0), (0, 1), (0, 3), None, (1, 0)]
    labels = [-100, 5, 5, 5, -100, 5]
    t_keys = [None, None, (0, 0), (0, 3), (1, 0), (1, 0)]
    assert align_positions(s_keys, labels, t_keys) == ([0, 2, 4], [1, 2, 3])


def test_shared_vocabulary_pairs_tokens_of_the_same_text(two_tokenizers):
    chars, words = two_tokenizers
    s_ids, t_ids = shared_vocabulary(chars, words, len(chars), len(words))
    s_text = chars.convert_ids_to_tokens(s_ids.tolist())
    t_text = words.convert_ids_to_tokens(t_ids.tolist())
    assert s_text == t_text  # the same byte-level pieces
    assert "r" in s_text and "<|im_end|>" in s_text
    assert "red" not in s_text and "Ġcircle" not in s_text  # only in the teacher's vocabulary
    # Both hold the 256 byte pieces: the 128 ASCII ones are whole characters and shared, the others are parts
    # of UTF-8 sequences (no text of their own) and not; plus the 4 added tokens.
    assert len(s_ids) == 128 + 4


# ------------------------------------------------------------------------------------------ divergence
def _reference64(zs, zt, shared_s, shared_t, kind):
    """The divergence written out position by position in float64 (module docstring of cross_tokenizer)."""
    out = []
    for row_s, row_t in zip(zs.double(), zt.double()):
        p = torch.softmax(row_s, 0).tolist()
        q = torch.softmax(row_t, 0).tolist()
        ps, qs = [p[i] for i in shared_s], [q[i] for i in shared_t]
        mt = sum(qs)
        d = 0.0
        if ps:
            a = [x / sum(ps) for x in ps]
            b = [x / mt for x in qs]
            if kind == "fkl":
                m = sum(bi * math.log(bi / ai) for ai, bi in zip(a, b))
            elif kind == "rkl":
                m = sum(ai * math.log(ai / bi) for ai, bi in zip(a, b))
            else:  # jsd, beta = 0.5
                mix = [(ai + bi) / 2 for ai, bi in zip(a, b)]
                m = 0.5 * sum(bi * math.log(bi / c) for bi, c in zip(b, mix))
                m += 0.5 * sum(ai * math.log(ai / c) for ai, c in zip(a, mix))
            d += mt * m
        rs = sorted((p[i] for i in range(len(p)) if i not in shared_s), reverse=True)
        rt = sorted((q[i] for i in range(len(q)) if i not in shared_t), reverse=True)
        width = max(len(rs), len(rt))
        rs, rt = rs + [0.0] * (width - len(rs)), rt + [0.0] * (width - len(rt))
        d += sum(abs(x - y) for x, y in zip(rs, rt))
        out.append(d)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_divergence_equals_float64_reference(kind):
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 7, generator=g) * 2, torch.randn(5, 9, generator=g) * 2
    shared_s, shared_t = [0, 2, 3, 6], [8, 1, 4, 0]
    got = cross_vocab_divergence(
        F.log_softmax(zs, -1), F.log_softmax(zt, -1), torch.tensor(shared_s), torch.tensor(shared_t), kind
    )
    torch.testing.assert_close(
        got.double(), _reference64(zs, zt, shared_s, shared_t, kind), rtol=1e-5, atol=1e-6
    )


def test_divergence_limits():
    g = torch.Generator().manual_seed(1)
    a, b = (
        F.log_softmax(torch.randn(4, 6, generator=g), -1),
        F.log_softmax(torch.randn(4, 6, generator=g), -1),
    )
    same = torch.arange(6)
    # One vocabulary: exactly the ordinary MDist.
    torch.testing.assert_close(
        cross_vocab_divergence(a, b, same, same, "fkl"), divergence_from_logprobs(a, b, "fkl")
    )
    # No shared token: ULD, the L1 distance of the sorted probabilities (padded).
    none = torch.tensor([], dtype=torch.long)
    c = F.log_softmax(torch.randn(4, 9, generator=g), -1)
    uld = F.pad(a.exp().sort(-1, descending=True).values, (0, 3)) - c.exp().sort(-1, descending=True).values
    torch.testing.assert_close(cross_vocab_divergence(a, c, none, none), uld.abs().sum(-1))
    # The same distribution under a permuted vocabulary: 0.
    perm = torch.randperm(6, generator=g)
    assert cross_vocab_divergence(a, a[:, perm], perm[:3], torch.arange(3)).abs().max() < 1e-6


def test_pool_visual():
    h = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3)
    pooled = pool_visual(h, 4)  # 4x4 grid -> 2x2 grid: each output the mean of a 2x2 block
    grid = h.view(2, 4, 4, 3)
    expected = torch.stack(
        [grid[:, i : i + 2, j : j + 2].mean(dim=(1, 2)) for i in (0, 2) for j in (0, 2)], dim=1
    )
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(pool_visual(h[:, :6], 3), (h[:, 0:6:2] + h[:, 1:6:2]) / 2)  # not square: 1-D
    assert pool_visual(h, 16) is h
    with pytest.raises(ValueError, match="cannot pool 16"):
        pool_visual(h, 25)


# ------------------------------------------------------------------------------- the chunked objective
def _toy_pair(g, ns, nt):
    """A student (V=11, d=8, 26 positions) and a teacher (V=13, d=10, 29 positions) of two samples: hidden
    states, heads, labels, visual masks (ns / nt positions), aligned positions, shared tokens, weights."""
    B, T, Tt, d, dt, V, Vt = 2, 26, 29, 8, 10, 11, 13
    hs = torch.randn(B, T, d, generator=g, requires_grad=True)
    ws = torch.randn(V, d, generator=g, requires_grad=True)
    ht, wt = torch.randn(B, Tt, dt, generator=g), torch.randn(Vt, dt, generator=g)
    labels = torch.full((B, T), -100)
    labels[:, 20:25] = torch.randint(0, V, (B, 5), generator=g)
    vis = torch.zeros(B, T, dtype=torch.bool)
    vis[:, 1 : 1 + ns] = True
    tvis = torch.zeros(B, Tt, dtype=torch.bool)
    tvis[:, 0:nt] = True
    align_s = torch.tensor([[19, 21, 23], [20, 22, -1]])
    align_t = torch.tensor([[28, 20, 24], [21, 26, -1]])
    shared = (torch.tensor([0, 3, 5, 9]), torch.tensor([2, 3, 12, 7]))
    weights = {"ce": 1.0, "mdist_resp": 0.7, "mdist_vis": 0.5, "rdist": 0.3}
    return hs, ws, ht, wt, labels, vis, tvis, align_s, align_t, shared, weights


@pytest.mark.parametrize("ns,nt", [(4, 16), (16, 4)], ids=["teacher-grid-pooled", "student-grid-pooled"])
def test_chunked_objective_equals_plain_autograd(ns, nt):
    """cross_tokenizer_loss (chunks of 3 rows, gradients in the forward pass) against the same terms from
    full logits with autograd: values and the gradients wrt hidden states and both heads' inputs."""
    g = torch.Generator().manual_seed(2)
    B, d, dt, V, Vt = 2, 8, 10, 11, 13
    hs, ws, ht, wt, labels, vis, tvis, align_s, align_t, shared, weights = _toy_pair(g, ns, nt)
    settings = DistillSettings(kind="fkl", temperature=2.0)
    total, terms = cross_tokenizer_loss(
        hs, ws, labels, weights, ht, wt, align_s, align_t, shared, settings,
        vis_mask=vis, teacher_vis_mask=tvis, num_visual_tokens=ns, teacher_visual_tokens=nt, chunk_size=3,
    )  # fmt: skip
    total.backward()
    grad_h, grad_w = hs.grad.clone(), ws.grad.clone()
    hs.grad, ws.grad = None, None

    zs, zt = hs @ ws.t(), ht @ wt.t()
    resp = response_mask(labels)
    ce = F.cross_entropy(zs[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    tau = settings.temperature
    rows_s = torch.cat([zs[b, align_s[b][align_s[b] >= 0]] for b in range(B)])
    rows_t = torch.cat([zt[b, align_t[b][align_t[b] >= 0]] for b in range(B)])

    def div(a, b):
        return (
            cross_vocab_divergence(
                F.log_softmax(a / tau, -1), F.log_softmax(b / tau, -1), *shared, "fkl"
            ).mean()
            * tau**2
        )

    mresp = div(rows_s, rows_t)
    n = min(ns, nt)
    vs = pool_visual(hs[vis].view(B, ns, d), n) @ ws.t()
    vt = pool_visual(ht[tvis].view(B, nt, dt), n) @ wt.t()
    mvis = div(vs.reshape(-1, V), vt.reshape(-1, Vt))
    rdist = relation_distill(vs, vt)
    ref = ce + 0.7 * mresp + 0.5 * mvis + 0.3 * rdist
    ref.backward()
    assert int(resp.sum()) == 10 and abs(float(terms["aligned"]) - 0.5) < 1e-6
    for name, value in (("ce", ce), ("mdist_resp", mresp), ("mdist_vis", mvis), ("rdist", rdist)):
        torch.testing.assert_close(terms[name], value.detach(), rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(total.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_h, hs.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_w, ws.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["fkl", "jsd"])
def test_one_tokenizer_gives_the_ordinary_objective(kind):
    """Same vocabulary, same visual count, every response position aligned to itself: the cross-tokenizer
    objective equals the fused same-vocabulary one, term by term and in its gradient."""
    from mllm_kd.losses.fused import fused_distill_loss

    g = torch.Generator().manual_seed(3)
    B, T, d, dt, V, n = 2, 16, 8, 12, 11, 4
    hs = torch.randn(B, T, d, generator=g, requires_grad=True)
    ws = torch.randn(V, d, generator=g)
    ht, wt = torch.randn(B, T, dt, generator=g), torch.randn(V, dt, generator=g)
    labels = torch.full((B, T), -100)
    labels[:, 9:15] = torch.randint(0, V, (B, 6), generator=g)
    vis = torch.zeros(B, T, dtype=torch.bool)
    vis[:, 2 : 2 + n] = True
    resp = response_mask(labels)
    align = torch.stack([resp[b].nonzero()[:, 0] for b in range(B)])
    weights = {"ce": 1.0, "mdist_resp": 0.7, "mdist_vis": 0.5, "rdist": 0.3}
    settings = DistillSettings(kind=kind, temperature=1.5)
    total, terms = cross_tokenizer_loss(
        hs, ws, labels, weights, ht, wt, align, align, (torch.arange(V), torch.arange(V)), settings,
        vis_mask=vis, teacher_vis_mask=vis, num_visual_tokens=n, teacher_visual_tokens=n, chunk_size=5,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(total, hs)
    ref_total, ref_terms = fused_distill_loss(hs, ws, labels, weights, ht, wt, vis, n, settings, chunk_size=5)
    (ref_grad,) = torch.autograd.grad(ref_total, hs)
    assert float(terms["aligned"]) == 1.0
    for name in ("ce", "mdist_resp", "mdist_vis", "rdist"):
        torch.testing.assert_close(terms[name], ref_terms[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ refusals
def test_other_vocabulary_is_refused_naming_the_option(two_tokenizers):
    from types import SimpleNamespace

    from mllm_kd.teacher.load import check_compatible

    chars, words = two_tokenizers
    model = SimpleNamespace(vocab_size=len(chars), num_visual_tokens=4)
    with pytest.raises(CompatibilityError, match=r"loss\.cross_tokenizer=true"):
        check_compatible(model, words, model, chars, "T")
    check_compatible(model, words, model, chars, "T", cross_tokenizer=True)  # no refusal with the option


def test_cross_tokenizer_refuses_webdataset_shards(two_tokenizers):
    from types import SimpleNamespace

    from mllm_kd.config import DataConfig
    from mllm_kd.data.cross_tokens import with_teacher_encoding
    from mllm_kd.data.datasets import TrainData

    chars, words = two_tokenizers
    data = TrainData(dataset=torch.utils.data.TensorDataset(torch.zeros(1)), sampler=None, num_samples=1)
    teacher = SimpleNamespace(
        num_visual_tokens=4, image_token_id=image_token_id(words), vocab_size=len(words)
    )
    with pytest.raises(ConfigError, match=r"data\.format=llava_json"):
        with_teacher_encoding(data, DataConfig(), chars, teacher, words, None, len(chars))


def test_cross_tokenizer_accepts_a_cached_teacher():
    cfg = resolve_stage_config(
        {"teacher": {"cache": "somewhere"}, "loss": {"cross_tokenizer": True}}, "stage2"
    )
    assert cfg.loss.cross_tokenizer and cfg.teacher.cache == "somewhere"


# ------------------------------------------------------------------------------- stages 1-3, end to end
def _recipe(root: Path) -> dict:
    llm = {"model_type": "qwen2", "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
           "max_position_embeddings": 256, "tie_word_embeddings": True}  # fmt: skip
    student_vision = {**TINY_CLIP, "patch_size": 16}  # 2 x 2 = 4 visual tokens
    return {
        "run_dir": str(root),
        "data_dir": str(root / "data"),
        "model": {
            "vision": {"config": student_vision, "drop_cls": True},
            "llm": {"config": {**llm, "hidden_size": 32, "num_hidden_layers": 1}},
            "tokenizer": str(root / "data" / "tokenizer"),
        },
        "teacher": {
            "checkpoint": str(root / "teacher_pt"),
            "model": {  # 4 x 4 = 16 visual tokens, its own tokenizer
                "vision": {"config": TINY_CLIP, "drop_cls": True},
                "llm": {"config": {**llm, "hidden_size": 48, "num_hidden_layers": 1}},
                "tokenizer": str(root / "teacher_tokenizer"),
            },
        },
        "loss": {"cross_tokenizer": True, "chunk_size": 16},
        "data": {"image_folder": str(root / "data" / "images"), "max_length": 128},
        "train": {"batch_size": 4, "max_steps": 3, "progress": False},
        "optim": {"lr": 1e-2, "warmup_ratio": 0.0},
        "stages": {
            "teacher_pt": {"data": {"path": str(root / "data" / "captions.json")}, "train": {"max_steps": 1}},
            "stage1": {"data": {"path": str(root / "data" / "captions.json")}, "loss": {"w_ce": 0.0}},
            "stage2": {"data": {"path": str(root / "data" / "instruct.json")}},
            "stage3": {"data": {"path": str(root / "data" / "instruct.json")}},
        },
    }


@pytest.fixture(scope="module")
def cross_run(tmp_path_factory):
    """A run directory with the generated data, a teacher tokenizer trained on its answers (320 tokens) and a
    teacher (16 visual tokens) trained one step; returns ``(root, recipe)``."""
    from mllm_kd.data_prep.synthetic import make_synthetic
    from mllm_kd.stages import STAGES

    root = tmp_path_factory.mktemp("cross_run")
    make_synthetic(root / "data", n_images=8)
    texts = [
        t["value"]
        for r in json.loads((root / "data" / "instruct.json").read_text())
        for t in r["conversations"]
    ]
    train_bpe_tokenizer(texts, root / "teacher_tokenizer", vocab_size=320)
    recipe = _recipe(root)
    STAGES["teacher_pt"].run(resolve_stage_config(recipe, "teacher_pt", STAGES["teacher_pt"].defaults))
    return root, recipe


def test_stages_distil_across_tokenizers(cross_run):
    from mllm_kd.stages import STAGES

    tmp_path, recipe = cross_run

    def cfg(stage):
        return resolve_stage_config(recipe, stage, STAGES[stage].defaults)

    before = None
    for stage in ("stage1", "stage2", "stage3"):
        out = STAGES[stage].run(cfg(stage))
        rows = [json.loads(line) for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 3
        for row in rows:
            if stage == "stage2":  # SFT: no teacher, the option changes nothing
                assert "mdist_resp" not in row and math.isfinite(row["loss"]), row
                continue
            assert all(math.isfinite(row[k]) for k in ("loss", "mdist_resp", "mdist_vis", "rdist")), row
            assert row["aligned"] > 0.2 and row["mdist_resp"] > 0 and row["mdist_vis"] > 0, row
        if stage == "stage1":  # the projector learns from the teacher alone (w_ce=0): the loss falls
            assert rows[-1]["loss"] < rows[0]["loss"], rows
        # Gradients reach the student (stage 1: projector only, no CE: from the cross-tokenizer terms alone).
        assert all(row["grad_norm"] > 0 for row in rows), rows
        weights = load_file(out / "model.safetensors")
        if before is not None:
            changed = [k for k in weights if k.startswith("llm.") and not torch.equal(weights[k], before[k])]
            assert changed, f"{stage}: no LLM weight changed"
        before = weights


# ------------------------------------------------------------------- from a cached teacher (teacher.cache)
def _pair_maps(shared, vocab, teacher_vocab):
    """(teacher id -> student id, vocab for a token the student lacks), the student's shared tokens, the
    teacher's: as the cache builder maps them."""
    to_student = torch.full((teacher_vocab,), vocab)
    to_student[shared[1]] = shared[0]
    in_shared = torch.zeros(vocab, dtype=torch.bool)
    in_shared[shared[0]] = True
    shared_t = torch.zeros(teacher_vocab, dtype=torch.bool)
    shared_t[shared[1]] = True
    return to_student, in_shared, shared_t


def _topk_rows(zt, k, to_student, shared_t):
    """What the cache holds for teacher logits rows ``zt`` (top-k log p, student ids, log p_rest, its shared
    part), written out here at full precision."""
    lt = F.log_softmax(zt, -1)
    top, idx = lt.topk(k, -1)
    others = lt.scatter(1, idx, float("-inf"))
    return (
        top,
        to_student[idx],
        others.logsumexp(-1),
        others.masked_fill(~shared_t, float("-inf")).logsumexp(-1),
    )


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "skl", "srkl"])
def test_topk_divergence_with_the_whole_vocabulary_equals_the_online_one(kind):
    """k = V_T: nothing is truncated, and the divergence from the top-k equals cross_vocab_divergence in
    float64, values and gradients."""
    from mllm_kd.losses.cached_cross import topk_cross_divergence

    g = torch.Generator().manual_seed(4)
    V, Vt = 9, 12
    shared = (torch.tensor([0, 3, 5, 8]), torch.tensor([11, 2, 4, 0]))
    to_student, in_shared, shared_t = _pair_maps(shared, V, Vt)
    zs = (torch.randn(6, V, generator=g, dtype=torch.float64) * 2).requires_grad_()
    zt = torch.randn(6, Vt, generator=g, dtype=torch.float64) * 3
    ref = cross_vocab_divergence(F.log_softmax(zs, -1), F.log_softmax(zt, -1), *shared, kind)
    got = topk_cross_divergence(
        F.log_softmax(zs, -1), *_topk_rows(zt, Vt, to_student, shared_t), in_shared, kind
    )
    assert got.dtype == torch.float64 and (ref > 1e-3).all()
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    w = torch.rand(6, generator=g, dtype=torch.float64)
    grads = [torch.autograd.grad((x * w).sum(), zs)[0] for x in (got, ref)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_topk_divergence_on_a_peaked_teacher_is_a_close_lower_bound():
    """k = 32 of 300 teacher tokens, a peaked teacher (about 2% of its mass outside the top 32) and a student
    near it on the shared tokens: within 2% of the full divergence, never above it, and the gradient points
    the same way (cosine > 0.999)."""
    from mllm_kd.losses.cached_cross import topk_cross_divergence

    g = torch.Generator().manual_seed(0)
    N, V, Vt, S = 64, 200, 300, 120
    shared = (torch.randperm(V, generator=g)[:S], torch.randperm(Vt, generator=g)[:S])
    to_student, in_shared, shared_t = _pair_maps(shared, V, Vt)
    zt = torch.randn(N, Vt, generator=g, dtype=torch.float64) * 4
    zs = torch.randn(N, V, generator=g, dtype=torch.float64) * 4
    zs[:, shared[0]] = zt[:, shared[1]] + torch.randn(N, S, generator=g, dtype=torch.float64)
    zs.requires_grad_()
    top = _topk_rows(zt, 32, to_student, shared_t)
    assert 0.01 < float(top[2].exp().mean()) < 0.03  # the teacher's mass left out
    for kind in ("fkl", "rkl", "jsd"):
        ref = cross_vocab_divergence(F.log_softmax(zs, -1), F.log_softmax(zt, -1), *shared, kind)
        got = topk_cross_divergence(F.log_softmax(zs, -1), *top, in_shared, kind)
        assert (got <= ref + 1e-12).all(), kind
        assert float(1 - got.mean().detach() / ref.mean().detach()) < 0.02, kind
        g_ref, g_got = (torch.autograd.grad(x.mean(), zs)[0].flatten() for x in (ref, got))
        assert F.cosine_similarity(g_ref, g_got, dim=0) > 0.999, kind


class _LargestResult(TorchDispatchMode):
    """The largest number of elements of a tensor any op returns inside the mode."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("ns,nt", [(4, 16), (16, 4)], ids=["teacher-grid-pooled", "student-grid-pooled"])
def test_cached_objective_with_the_whole_vocabulary_equals_the_online_one(ns, nt):
    """cached_cross_tokenizer_loss, from the rows a cross-tokenizer cache holds with k = V_T (aligned rows at
    the teacher's positions, pooled visual rows, relation matrices), equals cross_tokenizer_loss: terms and
    gradients wrt the student's hidden states and head."""
    from mllm_kd.losses.cached import CachedBatch
    from mllm_kd.losses.cached_cross import CrossCachedBatch, cached_cross_tokenizer_loss

    g = torch.Generator().manual_seed(5)
    B, T, d, dt, V, Vt = 2, 26, 8, 10, 11, 13
    hs, ws, ht, wt, labels, vis, tvis, align_s, align_t, shared, weights = _toy_pair(g, ns, nt)
    settings = DistillSettings(kind="jsd")
    total, terms = cross_tokenizer_loss(
        hs, ws, labels, weights, ht, wt, align_s, align_t, shared, settings,
        vis_mask=vis, teacher_vis_mask=tvis, num_visual_tokens=ns, teacher_visual_tokens=nt, chunk_size=3,
    )  # fmt: skip
    want = torch.autograd.grad(total, [hs, ws])

    n = min(ns, nt)
    pooled = pool_visual(ht[tvis].view(B, nt, dt), n)
    rows, positions, sample = [], [], []
    for b in range(B):
        keep = align_s[b] >= 0
        rows += [ht[b, align_t[b][keep]], pooled[b]]
        positions += [align_s[b][keep], torch.full((n,), -1)]
        sample.append(torch.full((int(keep.sum()) + n,), b))
    to_student, in_shared, shared_t = _pair_maps(shared, V, Vt)
    top, idx, rest, rest_shared = _topk_rows(torch.cat(rows) @ wt.t(), Vt, to_student, shared_t)
    zv = pooled @ wt.t()
    cached = CrossCachedBatch(
        CachedBatch(top, idx, rest, zv @ zv.transpose(1, 2)),
        rest_shared, torch.cat(positions), torch.cat(sample), in_shared, n,
    )  # fmt: skip
    with _LargestResult() as largest:  # the memory bound: no [B, T, V] tensor, forward or backward
        got_total, got_terms = cached_cross_tokenizer_loss(
            hs, ws, labels, weights, cached, settings, vis, ns, chunk_size=4
        )
        got = torch.autograd.grad(got_total, [hs, ws])
    assert largest.numel <= max(B * T * d, V * d, 4 * (V + 1)) < B * T * V
    assert got_terms.keys() == terms.keys() == {"ce", "mdist_resp", "mdist_vis", "rdist", "aligned"}
    for name in terms:
        torch.testing.assert_close(got_terms[name], terms[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(got_total, total, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _first_step(stage, cfg):
    from mllm_kd.stages import STAGES

    metrics = {}
    out = STAGES[stage].run(cfg, on_step=lambda step, m: metrics.setdefault(step, m))
    return metrics, out


def test_stage1_from_a_cross_tokenizer_cache_of_the_whole_vocabulary_matches_the_online_teacher(cross_run):
    """A cache with k = V_T: stage 1's first step from it has the online cross-tokenizer teacher's terms, up
    to the float16 rounding of the stored log-probabilities (relative 2^-11 of each log p) and relations."""
    from mllm_kd.stages import STAGES
    from mllm_kd.teacher.build import build_teacher_cache

    root, recipe = cross_run
    from mllm_kd.checkpoint.native import load_checkpoint_model

    base = ["train.max_steps=1", f"output_dir={root}/s1_online"]
    teacher_vocab = load_checkpoint_model(root / "teacher_pt")[0].vocab_size
    full = [f"teacher.cache_topk={teacher_vocab}"]
    cfg = resolve_stage_config(recipe, "stage1", STAGES["stage1"].defaults, [*base, *full])
    manifest = build_teacher_cache(cfg, root / "cache_s1", progress=False)
    cross = manifest["layout"]["cross_tokenizer"]
    assert cross["visual_rows_per_image"] == 4 and cross["teacher_visual_tokens"] == 16
    assert cross["teacher_vocab_size"] == teacher_vocab and 0 < cross["aligned_fraction"] <= 1
    stats = manifest["stats"]
    assert stats["rows"] == stats["response_rows"] + 4 * stats["images"] and stats["mean_leftover_mass"] == 0
    online, _ = _first_step("stage1", cfg)
    cached_cfg = resolve_stage_config(
        recipe, "stage1", STAGES["stage1"].defaults,
        [*base, *full, f"output_dir={root}/s1_cached", f"teacher.cache={root}/cache_s1"],
    )  # fmt: skip
    cached, _ = _first_step("stage1", cached_cfg)
    on, off = online[1], cached[1]
    assert off["aligned"] == on["aligned"] == pytest.approx(cross["aligned_fraction"], abs=0.2)
    assert off["mdist_resp"] == pytest.approx(on["mdist_resp"], rel=2e-3)
    assert off["mdist_vis"] == pytest.approx(on["mdist_vis"], rel=2e-3)
    assert off["rdist"] == pytest.approx(on["rdist"], abs=1e-4)
    assert off["loss"] == pytest.approx(on["loss"], rel=2e-3)


@pytest.fixture(scope="module")
def stage3_cache(cross_run):
    """A cross-tokenizer cache for stage 3, built by the command (default k = 32; the student built fresh:
    init_from=null); returns its manifest and the overrides it was built with."""
    from omegaconf import OmegaConf

    from mllm_kd import cache_teacher

    root, recipe = cross_run
    OmegaConf.save(OmegaConf.create(recipe), root / "recipe.yaml")
    common = ["init_from=null", "train.max_steps=2"]
    argv = [
        "--config",
        str(root / "recipe.yaml"),
        "--stage",
        "stage3",
        *common,
        f"teacher.cache={root}/cache_s3",
    ]
    assert cache_teacher.main(argv) == 0
    return json.loads((root / "cache_s3" / "manifest.json").read_text()), common


def test_stage3_trains_from_a_cross_tokenizer_cache(cross_run, stage3_cache):
    """The default k = 32 of the teacher's 320 tokens: stage 3 reads only the cache (no teacher checkpoint
    given), every term is finite and positive, and gradients reach the student."""
    from mllm_kd.stages import STAGES

    root, recipe = cross_run
    manifest, common = stage3_cache
    assert manifest["layout"]["k"] == 32 and manifest["stats"]["mean_leftover_mass"] > 0
    run = [
        *common,
        f"output_dir={root}/s3_cached",
        f"teacher.cache={root}/cache_s3",
        "teacher.checkpoint=null",
    ]
    STAGES["stage3"].run(resolve_stage_config(recipe, "stage3", STAGES["stage3"].defaults, run))
    rows = [json.loads(line) for line in (root / "s3_cached" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("loss", "mdist_resp", "mdist_vis", "rdist"))
        assert row["aligned"] > 0.2 and row["grad_norm"] > 0, row


def test_a_cross_tokenizer_cache_is_refused_for_another_student_encoding(cross_run, stage3_cache, tmp_path):
    """The cache's record names the student's tokenizer, template and visual-token count, and that it was
    built for loss.cross_tokenizer: a stage that differs in any of them is refused, naming it."""
    from mllm_kd.stages import STAGES
    from mllm_kd.teacher.load import load_teacher
    from mllm_kd.train.stage import init_model

    root, recipe = cross_run
    _, common = stage3_cache

    def load(*overrides, tokenizer=None):
        args = [*common, f"teacher.cache={root}/cache_s3", *overrides]
        cfg = resolve_stage_config(recipe, "stage3", STAGES["stage3"].defaults, args)
        student, tok, model_cfg = init_model(cfg, cfg.model)
        return load_teacher(cfg, student, tokenizer or tok, model_cfg)

    assert load().cross["teacher_visual_tokens"] == 16  # the right one is accepted
    for overrides, match in (
        (["data.template=plain"], r"data\.template \(resolved\): cache 'chat'"),
        (["model.vision.config.patch_size=8"], "visual tokens per image: cache 4, this stage 16"),
        (["loss.cross_tokenizer=false"], r"loss\.cross_tokenizer: cache True, this stage None"),
    ):
        with pytest.raises(CompatibilityError, match=match):
            load(*overrides)
    other = load_tokenizer(train_bpe_tokenizer(["some other text entirely"] * 10, tmp_path / "tok", 300))
    with pytest.raises(CompatibilityError, match="tokenizer vocabulary: cache"):
        load(tokenizer=other)


def test_samples_too_long_for_the_teacher_are_left_out_of_the_cache_and_the_stage(cross_run):
    """data.max_length=80: the 8 instruction samples with an image fit the student (65 tokens) but not the
    teacher (101: 16 visual tokens, its own tokenizer). The cache lists them, and the stage's data read from
    it skips exactly those, as the online two-tokenizer data set does."""
    from mllm_kd.data.cross_tokens import TeacherSkipped
    from mllm_kd.data.datasets import build_train_data
    from mllm_kd.data.encoding import ImageProcessor
    from mllm_kd.stages import STAGES
    from mllm_kd.teacher.build import build_teacher_cache
    from mllm_kd.teacher.cache import open_cache
    from mllm_kd.train.stage import init_model

    root, recipe = cross_run
    args = ["init_from=null", "data.max_length=80"]
    cfg = resolve_stage_config(recipe, "stage3", STAGES["stage3"].defaults, args)
    manifest = build_teacher_cache(cfg, root / "cache_s3_short", progress=False)
    listed = manifest["layout"]["cross_tokenizer"]["teacher_skipped"]
    assert len(listed) == 8 and manifest["stats"]["samples"] == 1 and manifest["stats"]["skipped"] == 8
    student, tok, model_cfg = init_model(cfg, cfg.model)
    images = ImageProcessor(
        student.vision.image_size, model_cfg.vision.image_mean, model_cfg.vision.image_std
    )
    data = build_train_data(cfg.data, tok, student.num_visual_tokens, student.image_token_id, images)
    assert not any(isinstance(data.dataset[i], TeacherSkipped) for i in range(len(data.dataset)))
    kept = open_cache(root / "cache_s3_short").without_skipped(data).dataset
    items = [kept[i] for i in range(len(kept))]
    dropped = [x for x in items if isinstance(x, TeacherSkipped)]
    assert sorted(x.sample_id for x in dropped) == sorted(listed)
    assert all("skipped for the teacher when the teacher cache" in str(x) for x in dropped)
    assert [x["id"] for x in items if not isinstance(x, TeacherSkipped)] == open_cache(
        root / "cache_s3_short"
    ).ids
