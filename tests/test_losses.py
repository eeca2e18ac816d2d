"""The losses against textbook formulas on small tensors."""

import math

import pytest
import torch

from mllm_kd.losses import (
    IGNORE_INDEX,
    DistillSettings,
    causal_lm_loss,
    distill_terms,
    kd_divergence,
    relation_distill,
    response_mask,
)

torch.manual_seed(0)


def _probs(z, tau=1.0):
    return torch.softmax(z.double() / tau, -1)


def _kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def _textbook(s, t, kind, tau=1.0, beta=0.5, alpha=0.1):
    ps, pt = _probs(s, tau), _probs(t, tau)
    if kind == "fkl":
        d = _kl(pt, ps)
    elif kind == "rkl":
        d = _kl(ps, pt)
    elif kind == "jsd":
        m = beta * pt + (1 - beta) * ps
        d = beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)
    elif kind == "skl":
        d = _kl(pt, alpha * pt + (1 - alpha) * ps)
    else:
        d = _kl(ps, alpha * ps + (1 - alpha) * pt)
    return d


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "skl", "srkl"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kd_divergence_matches_textbook(kind, tau):
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.bool)
    got = kd_divergence(s, t, mask, kind=kind, temperature=tau, beta=0.3, alpha=0.2)
    per_pos = _textbook(s, t, kind, tau, beta=0.3, alpha=0.2)
    want = per_pos[mask].mean() * tau**2
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)


def test_kd_divergence_hand_computed_two_tokens():
    # one position, V=2: p_T = softmax([0, ln 3]) = [1/4, 3/4], p_S = [1/2, 1/2]
    t = torch.tensor([[[0.0, math.log(3.0)]]])
    s = torch.zeros(1, 1, 2)
    mask = torch.ones(1, 1, dtype=torch.bool)
    fkl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    rkl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kd_divergence(s, t, mask, "fkl").item() == pytest.approx(fkl, rel=1e-6)
    assert kd_divergence(s, t, mask, "rkl").item() == pytest.approx(rkl, rel=1e-6)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "skl", "srkl"])
def test_kd_divergence_zero_for_identical_and_nonnegative(kind):
    z = torch.randn(3, 4, 9)
    mask = torch.ones(3, 4, dtype=torch.bool)
    assert kd_divergence(z, z.clone(), mask, kind=kind).abs().item() < 1e-6
    assert kd_divergence(torch.randn(3, 4, 9), z, mask, kind=kind).item() > 0


def test_kd_divergence_ignores_masked_positions():
    s, t = torch.randn(1, 4, 7), torch.randn(1, 4, 7)
    mask = torch.tensor([[True, False, True, False]])
    s2, t2 = s.clone(), t.clone()
    s2[0, 1] = 1e4  # garbage at masked-out positions must not matter
    t2[0, 3] = float("nan")
    assert kd_divergence(s2, t2, mask).item() == pytest.approx(kd_divergence(s, t, mask).item(), rel=1e-6)


def test_kd_divergence_empty_mask_is_zero_with_grad():
    s = torch.randn(1, 3, 5, requires_grad=True)
    out = kd_divergence(s, torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "skl", "srkl"])
def test_kd_divergence_gradients_finite_even_for_extreme_logits(kind):
    s = (torch.randn(2, 3, 8) * 50).requires_grad_()
    t = torch.randn(2, 3, 8) * 50
    t[0, 0, 0] = -1e4  # a teacher probability that underflows to 0
    kd_divergence(s, t, torch.ones(2, 3, dtype=torch.bool), kind=kind).backward()
    assert torch.isfinite(s.grad).all()


def test_kd_divergence_in_bf16_is_computed_in_fp32():
    s, t = torch.randn(1, 2, 6), torch.randn(1, 2, 6)
    mask = torch.ones(1, 2, dtype=torch.bool)
    got = kd_divergence(s.bfloat16(), t.bfloat16(), mask)
    want = kd_divergence(s.bfloat16().float(), t.bfloat16().float(), mask)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-6)


def test_kd_divergence_rejects_vocab_mismatch():
    with pytest.raises(ValueError, match="vocabulary"):
        kd_divergence(torch.randn(1, 2, 5), torch.randn(1, 2, 6), torch.ones(1, 2, dtype=torch.bool))


def test_relation_distill_matches_textbook():
    zs, zt = torch.randn(3, 4, 10), torch.randn(3, 4, 10)
    want = []
    for b in range(3):
        rs = (zs[b].double() @ zs[b].double().T).flatten()
        rt = (zt[b].double() @ zt[b].double().T).flatten()
        want.append(1 - rs @ rt / (rs.norm() * rt.norm()))
    assert relation_distill(zs, zt).item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-5)


def test_relation_distill_zero_for_identical_and_scale_invariant():
    z = torch.randn(2, 5, 7)
    assert relation_distill(z, z.clone()).abs().item() < 1e-6
    # cos(vec(R), vec(c^2 R)) = 1: relation distillation ignores a global logit scale
    assert relation_distill(3.0 * z, z).abs().item() < 1e-6


def test_relation_distill_has_image_mask():
    zs, zt = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    has = torch.tensor([True, False, True])
    assert relation_distill(zs, zt, has).item() == pytest.approx(
        relation_distill(zs[has], zt[has]).item(), rel=1e-6
    )
    none = relation_distill(zs.requires_grad_(), zt, torch.zeros(3, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(zs.grad).all()


def test_relation_distill_gradients_finite():
    zs = torch.randn(2, 4, 6, requires_grad=True)
    relation_distill(zs, torch.randn(2, 4, 6)).backward()
    assert torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0


def test_causal_lm_loss_and_response_mask_are_shifted():
    logits = torch.randn(1, 4, 6)
    labels = torch.tensor([[IGNORE_INDEX, 2, 5, IGNORE_INDEX]])
    # positions 0 and 1 predict labels 2 and 5
    want = -(torch.log_softmax(logits[0, 0], -1)[2] + torch.log_softmax(logits[0, 1], -1)[5]) / 2
    assert causal_lm_loss(logits, labels).item() == pytest.approx(want.item(), rel=1e-6)
    assert response_mask(labels).tolist() == [[True, True, False, False]]


def test_distill_terms_uses_right_positions():
    B, T, V, n = 2, 8, 9, 2
    s, t = torch.randn(B, T, V), torch.randn(B, T, V)
    vis = torch.zeros(B, T, dtype=torch.bool)
    vis[0, 1:3] = True  # different visual spans per sample
    vis[1, 3:5] = True
    labels = torch.full((B, T), IGNORE_INDEX)
    labels[0, 5:7] = 4
    labels[1, 6:8] = 1
    terms = distill_terms(s, t, labels, vis, n, DistillSettings())
    assert terms["mdist_resp"].item() == pytest.approx(
        kd_divergence(s, t, response_mask(labels)).item(), rel=1e-6
    )
    assert terms["mdist_vis"].item() == pytest.approx(kd_divergence(s, t, vis).item(), rel=1e-6)
    want_rel = relation_distill(torch.stack([s[0, 1:3], s[1, 3:5]]), torch.stack([t[0, 1:3], t[1, 3:5]]))
    assert terms["rdist"].item() == pytest.approx(want_rel.item(), rel=1e-6)
    only_vis = distill_terms(s, t, labels, vis, n, DistillSettings(resp=False, rel=False))
    assert set(only_vis) == {"mdist_vis"}
