"""The fused, chunked losses against their logits-level references (values and gradients), the bound on
the size of what they allocate, and the fused path of LossComputer on tiny multimodal models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mllm_kd.config import LLMConfig, LossConfig, ModelConfig, ProjectorConfig, StageConfig, VisionConfig
from mllm_kd.losses import (
    IGNORE_INDEX,
    KD_KINDS,
    DistillSettings,
    causal_lm_loss,
    distill_terms,
    kd_divergence,
    kernel,
    relation_distill,
)
from mllm_kd.losses.fused import (
    fused_causal_lm_loss,
    fused_cross_entropy,
    fused_distill_loss,
    fused_kd_divergence,
    fused_relation_distill,
)
from mllm_kd.losses.head import head_gram
from mllm_kd.model.multimodal import build_model
from mllm_kd.train.objective import LossComputer, fusable_head

RTOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one thread avoids thread-pool contention on busy 2-core machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_rel(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> None:
    """Equal within ``rtol`` relative to the reference's largest magnitude (float32 round-off only)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = want.detach().abs().max().item()
    if scale == 0:  # e.g. a parameter the loss does not reach
        assert got.abs().max().item() == 0
        return
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale)


def _head_problem(n_pos, vocab, d_s=16, d_t=24, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n_pos, d_s, generator=g).requires_grad_()
    ws = (torch.randn(vocab, d_s, generator=g) * 0.6).requires_grad_()
    ht = torch.randn(n_pos, d_t, generator=g)
    wt = torch.randn(vocab, d_t, generator=g) * 0.6
    bs = torch.randn(vocab, generator=g).requires_grad_() if bias else None
    bt = torch.randn(vocab, generator=g) if bias else None
    return hs, ws, bs, ht, wt, bt


def _logits(h, w, b):
    return h @ w.t() if b is None else h @ w.t() + b


# ------------------------------------------------------------------------------------------ MDist
@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize(("tau", "bias"), [(1.0, False), (2.0, True)])
def test_fused_kd_divergence_equals_reference_with_mask(kind, tau, bias):
    B, T, V = 2, 9, 37
    hs, ws, bs, ht, wt, bt = _head_problem(B * T, V, bias=bias)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, [1, 2, 5, 8]] = True
    mask[1, 3:9] = True
    params = [hs, ws] + ([bs] if bias else [])
    zs = _logits(hs, ws, bs).view(B, T, V)
    zt = _logits(ht, wt, bt).view(B, T, V)
    want = kd_divergence(zs, zt, mask, kind=kind, temperature=tau, beta=0.3, alpha=0.2)
    want_grads = torch.autograd.grad(want, params)

    flat = mask.view(-1)
    got = fused_kd_divergence(
        hs[flat],
        ws,
        ht[flat],
        wt,
        kind=kind,
        temperature=tau,
        beta=0.3,
        alpha=0.2,
        chunk_size=4,
        student_bias=bs,
        teacher_bias=bt,
    )
    got_grads = torch.autograd.grad(got, params)
    assert got.dtype == torch.float32 and got.item() > 0
    assert_rel(got, want)
    for g, w in zip(got_grads, want_grads):
        assert_rel(g, w)
    assert got_grads[0][~flat].abs().max() == 0  # unmasked positions get no gradient


@pytest.mark.parametrize("kind", KD_KINDS)
def test_fused_kd_divergence_large_vocab(kind):
    hs, ws, _, ht, wt, _ = _head_problem(23, 5000, d_s=32, d_t=48, seed=1)
    want = kd_divergence(
        (hs @ ws.t())[None], (ht @ wt.t())[None], torch.ones(1, 23, dtype=torch.bool), kind, 1.5, 0.4, 0.3
    )
    got = fused_kd_divergence(hs, ws, ht, wt, kind, 1.5, 0.4, 0.3, chunk_size=10)
    assert_rel(got, want)
    for g, w in zip(torch.autograd.grad(got, [hs, ws]), torch.autograd.grad(want, [hs, ws])):
        assert_rel(g, w)


@pytest.mark.parametrize(
    ("kind", "beta", "alpha"),
    [
        ("jsd", 0.0, 0.1),
        ("jsd", 1.0, 0.1),
        ("skl", 0.5, 0.0),
        ("skl", 0.5, 1.0),
        ("srkl", 0.5, 0.0),
        ("srkl", 0.5, 1.0),
    ],
)
def test_fused_kd_divergence_mixture_endpoints(kind, beta, alpha):
    hs, ws, _, ht, wt, _ = _head_problem(7, 50, seed=2)
    want = kd_divergence(
        (hs @ ws.t())[None],
        (ht @ wt.t())[None],
        torch.ones(1, 7, dtype=torch.bool),
        kind,
        beta=beta,
        alpha=alpha,
    )
    got = fused_kd_divergence(hs, ws, ht, wt, kind, beta=beta, alpha=alpha, chunk_size=3)
    assert got.item() == pytest.approx(want.item(), rel=RTOL, abs=1e-7)
    got_grads = torch.autograd.grad(got, [hs, ws])
    if not want.requires_grad:  # the divergence does not depend on the student at all (skl, alpha=1)
        assert want.item() == 0.0 and all(g.abs().max() == 0 for g in got_grads)
        return
    for g, w in zip(got_grads, torch.autograd.grad(want, [hs, ws])):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=1e-6)


def test_fused_kd_divergence_infinite_teacher_logits_use_reference_semantics():
    # A teacher that rules tokens out with -inf logits: q = 0 there and 0 * log 0 must count as 0.
    hs, ws, _, ht, wt, _ = _head_problem(9, 60, seed=3)
    bt = torch.zeros(60)
    bt[:10] = -float("inf")
    want = kd_divergence((hs @ ws.t())[None], (ht @ wt.t() + bt)[None], torch.ones(1, 9, dtype=torch.bool))
    got = fused_kd_divergence(hs, ws, ht, wt, teacher_bias=bt, chunk_size=4)
    assert torch.isfinite(got)
    assert_rel(got, want)
    for g, w in zip(torch.autograd.grad(got, [hs, ws]), torch.autograd.grad(want, [hs, ws])):
        assert_rel(g, w)


def test_fused_kd_divergence_empty_and_scaled_backward():
    hs, ws, _, ht, wt, _ = _head_problem(0, 20)
    got = fused_kd_divergence(hs, ws, ht, wt)
    assert got.item() == 0.0 and got.requires_grad
    got.backward()
    assert hs.grad.shape == (0, 16)
    # A non-unit incoming gradient scales the precomputed gradients.
    hs, ws, _, ht, wt, _ = _head_problem(5, 20)
    (3.0 * fused_kd_divergence(hs, ws, ht, wt, chunk_size=2)).backward()
    ref_h = hs.detach().clone().requires_grad_()
    (
        3.0 * kd_divergence((ref_h @ ws.t())[None], (ht @ wt.t())[None], torch.ones(1, 5, dtype=torch.bool))
    ).backward()
    assert_rel(hs.grad, ref_h.grad)


def test_fused_loss_refuses_a_second_backward():
    hs, ws, _, ht, wt, _ = _head_problem(4, 20)
    loss = fused_kd_divergence(hs, ws, ht, wt)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already backpropagated"):
        loss.backward()


def test_fused_kd_divergence_checks_vocabulary_and_params():
    hs, ws, _, ht, _, _ = _head_problem(4, 20)
    with pytest.raises(ValueError, match="share the vocabulary"):
        fused_kd_divergence(hs, ws, ht, torch.randn(21, 24))
    with pytest.raises(ValueError, match="unknown divergence"):
        fused_kd_divergence(hs, ws, ht, torch.randn(20, 24), kind="tvd")


def test_fused_bf16_matches_reference_rounding():
    hs, ws, _, ht, wt, _ = _head_problem(12, 300, seed=4)
    hs, ws = hs.detach().bfloat16().requires_grad_(), ws.detach().bfloat16().requires_grad_()
    ht, wt = ht.bfloat16(), wt.bfloat16()
    want = kd_divergence((hs @ ws.t())[None], (ht @ wt.t())[None], torch.ones(1, 12, dtype=torch.bool))
    got = fused_kd_divergence(hs, ws, ht, wt, chunk_size=5)
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    gots, wants = torch.autograd.grad(got, [hs, ws]), torch.autograd.grad(want, [hs, ws])
    for g, w in zip(gots, wants):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2 * w.float().abs().max().item())


# ---------------------------------------------------------------------------------------------- CE
def test_fused_cross_entropy_and_causal_lm_loss():
    hs, ws, bs, *_ = _head_problem(30, 400, bias=True, seed=5)
    targets = torch.randint(0, 400, (30,), generator=torch.Generator().manual_seed(0))
    targets[::3] = IGNORE_INDEX
    want = F.cross_entropy(hs @ ws.t() + bs, targets)
    got = fused_cross_entropy(hs, ws, targets, chunk_size=7, bias=bs)
    assert_rel(got, want)
    for g, w in zip(torch.autograd.grad(got, [hs, ws, bs]), torch.autograd.grad(want, [hs, ws, bs])):
        assert_rel(g, w)

    h3 = hs.detach().view(3, 10, 16).requires_grad_()
    labels = targets.view(3, 10).clone()
    want = causal_lm_loss(h3 @ ws.t(), labels)
    got = fused_causal_lm_loss(h3, ws, labels, chunk_size=4)
    assert_rel(got, want)
    assert_rel(torch.autograd.grad(got, h3)[0], torch.autograd.grad(want, h3)[0])
    nothing = fused_causal_lm_loss(h3, ws, torch.full_like(labels, IGNORE_INDEX))
    assert nothing.item() == 0.0 and nothing.requires_grad


# ------------------------------------------------------------------------------------------- RDist
@pytest.mark.parametrize("bias", [False, True])
def test_fused_relation_distill_equals_reference(bias):
    B, n, V = 3, 6, 500
    hs, ws, bs, ht, wt, bt = _head_problem(B * n, V, bias=bias, seed=6)
    hs = hs.detach().view(B, n, -1).requires_grad_()
    ht = ht.view(B, n, -1)
    has_image = torch.tensor([True, False, True])
    params = [hs, ws] + ([bs] if bias else [])
    want = relation_distill(_logits(hs, ws, bs), _logits(ht, wt, bt), has_image)
    got = fused_relation_distill(hs, ws, ht, wt, has_image, student_bias=bs, teacher_bias=bt)
    assert 0.01 < want.item() < 1.99
    assert_rel(got, want)
    for g, w in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        assert_rel(g, w)
    # A precomputed (cached) teacher Gram gives the same value; no image at all gives an attached 0.
    cached = fused_relation_distill(hs, ws, ht, None, has_image, bs, bt, teacher_gram=head_gram(wt, bt))
    assert cached.item() == got.item()
    none = fused_relation_distill(hs, ws, ht, wt, torch.zeros(3, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad


def test_head_gram_chunked_cast_and_bias_gradients():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(40000, 8, generator=g, dtype=torch.float64)  # > one 16384-row step
    b = torch.randn(40000, generator=g, dtype=torch.float64)
    w16, b16 = w.bfloat16().requires_grad_(), b.bfloat16().requires_grad_()
    x = torch.cat([w16.double(), b16.double()[:, None]], 1)
    torch.testing.assert_close(head_gram(w16, b16).double(), x.t() @ x, rtol=1e-4, atol=1e-3)  # fp32 sums
    probe = torch.randn(9, 9, generator=g)
    grads = torch.autograd.grad((head_gram(w16, b16) * probe).sum(), [w16, b16])
    xr = x.detach().requires_grad_()
    (want,) = torch.autograd.grad((xr.t() @ xr * probe.double()).sum(), xr)
    assert grads[0].dtype == torch.bfloat16
    torch.testing.assert_close(grads[0].double(), want[:, :8], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grads[1].double(), want[:, 8], rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------ the objective
def _objective_batch(seed=0):
    B, T, V, n = 2, 14, 300, 4
    hs, ws, _, ht, wt, _ = _head_problem(B * T, V, seed=seed)
    hs = hs.detach().view(B, T, -1).requires_grad_()
    ht = ht.view(B, T, -1)
    labels = torch.full((B, T), IGNORE_INDEX)
    vis = torch.zeros(B, T, dtype=torch.bool)
    vis[0, 2 : 2 + n] = True
    vis[1, 5 : 5 + n] = True
    labels[0, 2 + n : 11] = torch.arange(5)  # the last visual token predicts the first caption token
    labels[1, 10:14] = torch.arange(4) + 7
    return hs, ws, ht, wt, labels, vis, n


@pytest.mark.parametrize("rel_path", ["logits", "gram"])
@pytest.mark.parametrize(
    ("kind", "tau", "head_trains"),
    [("fkl", 1.0, True), ("jsd", 2.0, True), ("srkl", 0.5, True), ("fkl", 1.0, False)],
)
def test_fused_distill_loss_equals_reference_terms(kind, tau, head_trains, rel_path, monkeypatch):
    # RDist from the visual logits (few visual rows) or from W^T W (many): both equal the reference
    monkeypatch.setattr(kernel, "relation_from_logits", lambda rows, dim: rel_path == "logits")
    hs, ws, ht, wt, labels, vis, n = _objective_batch()
    ws.requires_grad_(head_trains)  # stage 1 trains the projector only: no head gradient at all
    params = [hs, ws] if head_trains else [hs]
    weights = {"ce": 0.7, "mdist_resp": 1.3, "mdist_vis": 0.5, "rdist": 2.0}
    settings = DistillSettings(kind=kind, temperature=tau, beta=0.3, alpha=0.2)
    zs, zt = hs @ ws.t(), ht @ wt.t()
    want_terms = {"ce": causal_lm_loss(zs, labels), **distill_terms(zs, zt, labels, vis, n, settings)}
    want = sum(weights[k] * v for k, v in want_terms.items())
    want_grads = torch.autograd.grad(want, params)

    got, terms = fused_distill_loss(hs, ws, labels, weights, ht, wt, vis, n, settings, chunk_size=5)
    assert set(terms) == set(want_terms)
    for k in terms:
        assert terms[k].item() == pytest.approx(want_terms[k].item(), rel=RTOL), k
    assert_rel(got, want)
    for g, w in zip(torch.autograd.grad(got, params), want_grads):
        assert_rel(g, w)
    assert want_grads[0].abs().sum() > 0


def test_fused_distill_loss_bf16_weights():
    hs, ws, ht, wt, labels, vis, n = _objective_batch(seed=2)
    hs16, ws16 = hs.detach().bfloat16().requires_grad_(), ws.detach().bfloat16().requires_grad_()
    ht16, wt16 = ht.bfloat16(), wt.bfloat16()
    weights = {"ce": 1.0, "mdist_resp": 1.0, "mdist_vis": 1.0, "rdist": 1.0}
    got, terms = fused_distill_loss(hs16, ws16, labels, weights, ht16, wt16, vis, n, chunk_size=5)
    got.backward()
    # The reference on the same (bf16-rounded) values in float32.
    h32, w32 = hs16.detach().float().requires_grad_(), ws16.detach().float().requires_grad_()
    zs, zt = h32 @ w32.t(), ht16.float() @ wt16.float().t()
    want_terms = {
        "ce": causal_lm_loss(zs, labels),
        **distill_terms(zs, zt, labels, vis, n, DistillSettings()),
    }
    sum(want_terms.values()).backward()
    for k in want_terms:
        assert terms[k].item() == pytest.approx(want_terms[k].item(), rel=2e-2), k
    for g, w in ((hs16.grad, h32.grad), (ws16.grad, w32.grad)):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w, rtol=5e-2, atol=5e-2 * w.abs().max().item())


def test_fused_distill_loss_respects_disabled_terms_and_ce_only():
    hs, ws, ht, wt, labels, vis, n = _objective_batch(seed=1)
    settings = DistillSettings(resp=False, rel=False)
    weights = {"ce": 0.0, "mdist_vis": 1.0}
    got, terms = fused_distill_loss(hs, ws, labels, weights, ht, wt, vis, n, settings)
    zs, zt = hs @ ws.t(), ht @ wt.t()
    assert set(terms) == {"ce", "mdist_vis"}
    assert terms["ce"].item() == pytest.approx(causal_lm_loss(zs, labels).item(), rel=RTOL)
    assert_rel(got, kd_divergence(zs, zt, vis))  # CE has weight 0: not in the total
    ce_only, terms = fused_distill_loss(hs, ws, labels, {"ce": 1.0})
    assert set(terms) == {"ce"}
    assert_rel(ce_only, causal_lm_loss(zs, labels))


# ------------------------------------------------------------------------------------ memory bound
class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_positions_by_vocabulary_tensor_beyond_one_chunk():
    N, V, d, chunk = 64, 1000, 8, 8
    hs, ws, _, ht, wt, _ = _head_problem(N, V, d_s=d, d_t=d)
    with _LargestTensor() as fused:
        loss = fused_kd_divergence(hs, ws, ht, wt, kind="jsd", chunk_size=chunk)
        loss = loss + fused_relation_distill(hs.view(4, 16, d), ws, ht.view(4, 16, d), wt)
        loss.backward()
    with _LargestTensor() as ref:
        mask = torch.ones(1, N, dtype=torch.bool)
        (kd_divergence((hs @ ws.t())[None], (ht @ wt.t())[None], mask, kind="jsd")).backward()
    # Largest allowed: one chunk of logits, or a head-sized gradient (V x d < chunk x V here).
    assert fused.largest <= chunk * V < N * V <= ref.largest


# ------------------------------------------------------------------------------------ LossComputer
CLIP = {**TINY_CLIP}
VOCAB, IMG_ID = 200, 199


def _tiny_mllm(hidden: int, tie: bool, seed: int, layers: int = 1):
    llm = {
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 64,
        "tie_word_embeddings": tie,
    }
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vision=VisionConfig(config=dict(CLIP)), projector=ProjectorConfig(), llm=LLMConfig(config=llm)
    )
    return build_model(cfg, image_token_id=IMG_ID, vocab_size=VOCAB)


def _mllm_batch(n_vis: int):
    g = torch.Generator().manual_seed(0)
    T = n_vis + 12
    ids = torch.randint(0, IMG_ID, (2, T), generator=g)
    ids[0, 1 : 1 + n_vis] = IMG_ID
    ids[1, 3 : 3 + n_vis] = IMG_ID
    attn = torch.ones(2, T, dtype=torch.long)
    attn[1, -2:] = 0
    labels = torch.full((2, T), IGNORE_INDEX)
    labels[0, 1 + n_vis :] = ids[0, 1 + n_vis :]  # caption right after the image
    labels[1, T - 7 : T - 2] = ids[1, T - 7 : T - 2]
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "pixel_values": torch.randn(2, 3, 32, 32, generator=g),
        "labels": labels,
    }


def _loss_once(student, teacher, batch, **loss_kw):
    student.zero_grad(set_to_none=True)
    fn = LossComputer(StageConfig(loss=LossConfig(**loss_kw)), teacher)
    total, terms = fn(student, batch)
    total.backward()
    grads = {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}
    return total.detach(), {k: v.detach() for k, v in terms.items()}, grads


@pytest.mark.parametrize(
    ("loss_kw", "student_bias"), [({}, False), ({"kind": "rkl", "temperature": 2.0}, True)]
)
def test_loss_computer_fused_equals_reference(loss_kw, student_bias, monkeypatch):
    student = _tiny_mllm(32, tie=not student_bias, seed=0)
    teacher = _tiny_mllm(48, tie=False, seed=1).eval().requires_grad_(False)
    if student_bias:  # a head with a bias is fused too (folded into the Gram for RDist)
        old = student.llm.lm_head
        student.llm.lm_head = nn.Linear(32, VOCAB, bias=True)
        student.llm.lm_head.weight.data.copy_(old.weight.data)
    student.vision.requires_grad_(False)
    batch = _mllm_batch(student.num_visual_tokens)

    calls = []
    original = type(student).forward
    monkeypatch.setattr(student, "forward", lambda *a, **k: calls.append(k) or original(student, *a, **k))
    kw = {**loss_kw, "chunk_size": 7}
    f_total, f_terms, f_grads = _loss_once(student, teacher, batch, fused=True, **kw)
    assert calls == [{"return_logits": False}]  # the student's logits are never computed
    r_total, r_terms, r_grads = _loss_once(student, teacher, batch, fused=False, **kw)

    assert set(f_terms) == set(r_terms) == {"ce", "mdist_resp", "mdist_vis", "rdist"}
    assert all(v.item() > 0 for v in r_terms.values())
    for k in r_terms:
        assert f_terms[k].item() == pytest.approx(r_terms[k].item(), rel=RTOL), k
    assert f_total.item() == pytest.approx(r_total.item(), rel=RTOL)
    assert set(f_grads) == set(r_grads) and "projector.0.weight" in f_grads
    assert ("llm.lm_head.bias" in f_grads) == student_bias
    for k in r_grads:
        assert_rel(f_grads[k], r_grads[k])


def test_loss_computer_ce_only_and_fallback():
    student = _tiny_mllm(32, tie=True, seed=0)
    batch = _mllm_batch(student.num_visual_tokens)
    f_total, f_terms, f_grads = _loss_once(student, None, batch)
    r_total, _, r_grads = _loss_once(student, None, batch, fused=False)
    assert set(f_terms) == {"ce"}
    assert f_total.item() == pytest.approx(r_total.item(), rel=RTOL)
    for k in r_grads:
        assert_rel(f_grads[k], r_grads[k])
    # A head the fused path cannot reproduce (a hook may change the logits) uses the reference.
    assert fusable_head(student) is student.llm.lm_head
    handle = student.llm.lm_head.register_forward_hook(lambda m, i, o: o * 2)
    assert fusable_head(student) is None
    hooked_total, _, _ = _loss_once(student, None, batch)
    handle.remove()
    assert hooked_total.item() != pytest.approx(r_total.item(), rel=1e-3)
    student.llm.config.final_logit_softcapping = 30.0
    assert fusable_head(student) is None


def test_no_grad_computes_values_only(monkeypatch):
    import mllm_kd.losses.online as fl

    seen = []
    original = fl._chunk_losses
    monkeypatch.setattr(fl, "_chunk_losses", lambda *a: seen.append(a[-1]) or original(*a))
    hs, ws, _, ht, wt, _ = _head_problem(6, 40)
    with torch.no_grad():
        got = fused_kd_divergence(hs, ws, ht, wt, chunk_size=4)
    want = kd_divergence((hs @ ws.t())[None], (ht @ wt.t())[None], torch.ones(1, 6, dtype=torch.bool))
    assert not got.requires_grad and seen == [False, False]
    assert got.item() == pytest.approx(want.item(), rel=RTOL)


def test_relation_path_rule():
    """The logits path only while it is cheaper than W^T W and Z stays smaller than a head gradient."""
    assert kernel.relation_from_logits(64, 577)  # the easy-VQA demo: 16 images x 4 tokens, d = 576
    assert not kernel.relation_from_logits(4 * 729, 897)  # the paper's 4 x 729 visual tokens, d = 896
    assert not kernel.relation_from_logits(0, 64)
    assert kernel.relation_from_logits(42, 64) and not kernel.relation_from_logits(43, 64)


# ------------------------------------------------------------------- distilling the projected images
def test_visual_embedding_distill_value_and_gradient():
    from mllm_kd.losses import visual_embedding_distill

    t = torch.tensor([[[3.0, 4.0]], [[0.0, 0.0]]])  # sum ||e_T||^2 = 25
    s = torch.tensor([[[3.0, 1.0]], [[1.0, 2.0]]], requires_grad=True)  # squared error 9 + 1 + 4 = 14
    loss = visual_embedding_distill(s, t)
    assert loss.item() == pytest.approx(14 / 25)
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * (s.detach() - t) / 25)
    assert visual_embedding_distill(t.clone(), t).item() == 0.0
    assert visual_embedding_distill(torch.zeros_like(t), t).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\(2, 1, 3\).*\(2, 1, 2\).*same LLM width"):
        visual_embedding_distill(torch.zeros(2, 1, 3), t)


@pytest.mark.parametrize("fused", [True, False])
def test_loss_computer_adds_the_projected_images_term(fused):
    """loss.w_emb adds w * vemb to the total on either path; vemb is the projectors' relative squared error,
    and its gradient reaches the student's projector and nothing of its LLM."""
    from mllm_kd.losses import visual_embedding_distill

    student = _tiny_mllm(32, tie=True, seed=0)
    teacher = _tiny_mllm(32, tie=False, seed=1).eval().requires_grad_(False)  # the same width
    student.vision.requires_grad_(False)
    batch = _mllm_batch(student.num_visual_tokens)
    with torch.no_grad():
        want = visual_embedding_distill(
            student.encode_images(batch["pixel_values"]), teacher.encode_images(batch["pixel_values"])
        )
    moved, base_grads = _check_feature_term(student, teacher, batch, fused, "w_emb", "vemb", want.item())
    assert moved == {k for k in base_grads if k.startswith("projector.")}  # and nothing of the LLM


def _check_feature_term(student, teacher, batch, fused, key, term, want):
    """``loss.<key>=0.5`` adds ``0.5 * want`` (logged as ``term``) to the total, and ``0.5 x`` the term's own
    gradient to the gradients. Returns the parameters the term alone moves, and the gradients without it."""
    base, base_terms, base_grads = _loss_once(student, teacher, batch, fused=fused)
    total, terms, grads = _loss_once(student, teacher, batch, fused=fused, **{key: 0.5})
    assert term not in base_terms and set(terms) == {*base_terms, term}
    assert terms[term].item() == pytest.approx(want, rel=1e-6) and want > 0
    assert total.item() == pytest.approx(base.item() + 0.5 * want, rel=1e-6)
    no_kd = {"w_ce": 0, "w_resp": 0, "w_vis": 0, "w_rel": 0}
    _, only, only_grads = _loss_once(student, teacher, batch, fused=fused, **no_kd, **{key: 1})
    assert only[term].item() == pytest.approx(want, rel=1e-6)
    _assert_gradients_add(grads, base_grads, only_grads, 0.5)
    return {k for k, g in only_grads.items() if g.abs().max() > 0}, base_grads


def _assert_gradients_add(grads, base_grads, only_grads, weight):
    """The gradients with a term at ``weight`` are the ones without it plus ``weight`` x the term's alone."""
    for k in base_grads:
        extra = weight * only_grads[k] if k in only_grads else 0
        torch.testing.assert_close(grads[k], base_grads[k] + extra, rtol=1e-4, atol=1e-7, msg=k)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("w_emb", r"loss.w_emb: the student projects each image to \(\d+, 32\).*\(\d+, 48\)"),
        ("w_hidden", r"loss.w_hidden: student hidden state 1 \(2, \d+, 32\).*\(2, \d+, 48\)"),
    ],
)
def test_loss_computer_refuses_the_feature_terms_across_widths(key, message):
    from mllm_kd.errors import TrainingError

    student = _tiny_mllm(32, tie=True, seed=0)
    teacher = _tiny_mllm(48, tie=False, seed=1).eval().requires_grad_(False)
    batch = _mllm_batch(student.num_visual_tokens)
    with pytest.raises(TrainingError, match=message):
        _loss_once(student, teacher, batch, **{key: 1.0})


# ------------------------------------------------------------------- distilling the hidden states
def test_hidden_layer_pairs_follow_keep_layers_or_a_uniform_map():
    from mllm_kd.losses import hidden_layer_pairs

    # student layer i is the teacher's layer keep[i]: its input is what the teacher feeds keep[i]
    assert hidden_layer_pairs(3, 9, [0, 3, 6]) == [(1, 3), (2, 6), (3, 9)]
    assert hidden_layer_pairs(3, 30, [0, 1, 29]) == [(1, 1), (2, 29), (3, 30)]
    assert hidden_layer_pairs(2, 4) == [(1, 2), (2, 4)]
    assert hidden_layer_pairs(3, 3) == [(1, 1), (2, 2), (3, 3)]
    assert hidden_layer_pairs(1, 5) == [(1, 5)]  # the final outputs only
    with pytest.raises(ValueError, match="2 entries but the student has 3"):
        hidden_layer_pairs(3, 9, [0, 3])
    with pytest.raises(ValueError, match="increasing indices of the teacher's 9 layers"):
        hidden_layer_pairs(3, 9, [0, 6, 3])
    with pytest.raises(ValueError, match="increasing indices of the teacher's 9 layers"):
        hidden_layer_pairs(3, 9, [0, 3, 9])
    with pytest.raises(ValueError, match="deeper than its 2-layer teacher"):
        hidden_layer_pairs(3, 2)


def test_hidden_state_distill_value_mask_and_gradient():
    from mllm_kd.losses import hidden_state_distill

    t0 = torch.tensor([[[3.0, 4.0], [100.0, 0.0], [9.0, 9.0]]])  # [B=1, T=3, d=2]; the last is padding
    t1 = torch.tensor([[[0.0, 2.0], [1.0, 0.0], [9.0, 9.0]]])
    s0 = torch.tensor([[[3.0, 1.0], [90.0, 0.0], [0.0, 0.0]]], requires_grad=True)
    s1 = torch.tensor([[[0.0, 2.0], [0.0, 0.0], [0.0, 0.0]]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    loss = hidden_state_distill([None, s0, s1], [None, None, t0, t1], [(1, 2), (2, 3)], mask)
    # per token ||s - t||^2 / ||t||^2: pair 1 (9/25 + 100/10000) / 2, pair 2 (0 + 1) / 2; mean of the pairs
    want = ((9 / 25 + 100 / 10000) / 2 + (0 + 1) / 2) / 2
    assert loss.item() == pytest.approx(want)
    loss.backward()
    torch.testing.assert_close(s0.grad[0, 0], 2 * (s0.detach()[0, 0] - t0[0, 0]) / 25 / 4)
    assert s0.grad[0, 2].abs().sum() == 0 and s1.grad[0, 2].abs().sum() == 0  # padding is not compared
    assert hidden_state_distill([None, t0], [None, t0], [(1, 1)], mask).item() == 0.0
    with pytest.raises(
        ValueError, match=r"student hidden state 1 \(1, 3, 3\).*teacher hidden state 1.*same width"
    ):
        hidden_state_distill([None, torch.zeros(1, 3, 3)], [None, t0], [(1, 1)], mask)


@pytest.mark.parametrize("fused", [True, False])
def test_loss_computer_adds_the_hidden_state_term(fused):
    """loss.w_hidden adds w * hidden to the total on either path: the student's 2 layers against a 4-layer
    teacher of its width on the uniform map (student states 1, 2 against the teacher's 2, 4), every real token."""
    from mllm_kd.losses import hidden_state_distill

    student = _tiny_mllm(32, tie=True, seed=0, layers=2)
    teacher = _tiny_mllm(32, tie=False, seed=1, layers=4).eval().requires_grad_(False)
    student.vision.requires_grad_(False)
    batch = _mllm_batch(student.num_visual_tokens)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    with torch.no_grad():
        s_layers = student(*args, return_layers=True).layers
        t_layers = teacher(*args, return_layers=True).layers
        want = hidden_state_distill(s_layers, t_layers, [(1, 2), (2, 4)], batch["attention_mask"].bool())
    assert len(s_layers) == 3 and len(t_layers) == 5
    moved, _ = _check_feature_term(student, teacher, batch, fused, "w_hidden", "hidden", want.item())
    assert "projector.0.weight" in moved and "llm.model.layers.0.mlp.up_proj.weight" in moved


# ------------------------------------------------------------- MDist_resp only where the teacher is right
@pytest.mark.parametrize("fused", [True, False])
def test_loss_computer_distils_the_response_only_where_the_teacher_is_right(fused):
    """loss.resp_where_teacher_right: MDist_resp is the mean over the answer tokens the teacher predicts
    (argmax) right, on either path; CE, MDist_vis and RDist are unchanged."""
    from mllm_kd.losses.reference import response_mask, teacher_right

    student = _tiny_mllm(32, tie=True, seed=0)
    teacher = _tiny_mllm(48, tie=False, seed=1).eval().requires_grad_(False)
    batch = _mllm_batch(student.num_visual_tokens)
    ids, attn, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    with torch.no_grad():
        t_logits = teacher(ids, attn, pixels).logits
    top = t_logits.argmax(-1)
    labels = batch["labels"].clone()
    resp = response_mask(labels)
    for i, (b, t) in enumerate(resp.nonzero().tolist()):  # every other answer token right, the rest wrong
        labels[b, t + 1] = top[b, t] if i % 2 == 0 else (top[b, t] + 1) % IMG_ID
    batch["labels"] = labels
    right = teacher_right(top, labels)
    assert int(right.sum()) == (int(resp.sum()) + 1) // 2 and not (right & ~resp).any()

    _, terms, _ = _loss_once(
        student, teacher, batch, fused=fused, chunk_size=7, resp_where_teacher_right=True
    )
    _, base, _ = _loss_once(student, teacher, batch, fused=fused, chunk_size=7)
    with torch.no_grad():
        s_logits = student(ids, attn, pixels).logits
    assert terms["mdist_resp"].item() == pytest.approx(
        kd_divergence(s_logits, t_logits, right).item(), rel=RTOL
    )
    assert base["mdist_resp"].item() == pytest.approx(
        kd_divergence(s_logits, t_logits, resp).item(), rel=RTOL
    )
    assert terms["mdist_resp"].item() != pytest.approx(base["mdist_resp"].item(), rel=1e-3)
    for k in ("ce", "mdist_vis", "rdist"):
        assert terms[k].item() == pytest.approx(base[k].item(), rel=RTOL), k
    assert terms["teacher_right"].item() == pytest.approx(right.sum().item() / resp.sum().item())
    assert "teacher_right" not in base


def test_resp_where_teacher_right_refuses_a_teacher_without_its_logits():
    from mllm_kd.errors import TrainingError

    teacher = _tiny_mllm(48, tie=False, seed=1).eval().requires_grad_(False)
    cfg = StageConfig(loss=LossConfig(resp_where_teacher_right=True, cross_tokenizer=True))
    with pytest.raises(TrainingError, match="resp_where_teacher_right needs the teacher model itself"):
        LossComputer(cfg, teacher)
