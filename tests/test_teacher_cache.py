"""The cached (offline) teacher: values against the online teacher, the loss, the stage run, refusals."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SMOKE
from torch.utils._python_dispatch import TorchDispatchMode

from mllm_kd import cache_teacher
from mllm_kd.checkpoint.native import load_checkpoint_model
from mllm_kd.cli import stage_config
from mllm_kd.data.datasets import Collator, build_train_data
from mllm_kd.data.encoding import ImageProcessor
from mllm_kd.errors import CompatibilityError, ConfigError
from mllm_kd.losses import DistillSettings, divergence_from_logprobs, relation_loss_from_gram, response_mask
from mllm_kd.losses.cached import (
    CachedBatch,
    bucketed_divergence,
    cached_distill_loss,
    cached_distill_loss_reference,
)
from mllm_kd.stages import STAGES
from mllm_kd.teacher.cache import open_cache
from mllm_kd.teacher.cache_format import relation_from_values, relation_values

# A float16 log-probability is within half a unit in the last place: 2^-11 relative.
FP16_RTOL = 2**-11


def _common(run, smoke_teacher):
    teacher = smoke_teacher / "teacher_sft"
    return [
        f"run_dir={run}",
        f"data_dir={smoke_teacher}/data",
        f"teacher.checkpoint={teacher}",
        f"model.vision.checkpoint={teacher}",
        "train.batch_size=4",
    ]


@pytest.fixture(scope="module")
def run(smoke_teacher, tmp_path_factory):
    """A run directory with a (briefly trained) stage-2 student and a teacher cache for stage 3 (k=32)."""
    run = tmp_path_factory.mktemp("cache_run")
    common = _common(run, smoke_teacher)
    STAGES["stage2"].run(stage_config(SMOKE, "stage2", [*common, "init_from=null", "train.max_steps=2"]))
    out = run / "cache"
    assert cache_teacher.main(["--config", str(SMOKE), *common, f"teacher.cache={out}"]) == 0
    return run, common, out


def _batch(cfg, n=6, order=None):
    """The first ``n`` samples of the stage's data (in ``order``), batched as the trainer does."""
    student, tok, model_cfg = load_checkpoint_model(cfg.init_from)
    images = ImageProcessor(
        student.vision.image_size, model_cfg.vision.image_mean, model_cfg.vision.image_std
    )
    data = build_train_data(cfg.data, tok, student.num_visual_tokens, student.image_token_id, images)
    items = [data.dataset[i] for i in (order or range(n))]
    return Collator(tok.pad_token_id)(items), student


def test_cli_writes_a_manifest_within_the_byte_budget(run, capsys, smoke_teacher):
    _, common, out = run
    n_samples = len(json.loads((smoke_teacher / "data" / "instruct.json").read_text()))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layout"]["k"] == 32 and manifest["layout"]["index_dtype"] == "uint16"
    stats = manifest["stats"]
    assert stats["samples"] == n_samples and stats["rows"] == stats["response_rows"] + stats["visual_rows"]
    # 32 x (2 + 2) + 4 bytes per row, plus the relation matrices (16 x 17 / 2 halves per image)
    assert stats["bytes_per_row_topk"] == 132 and stats["bytes_per_distilled_token"] < 300
    # an existing cache is not overwritten by accident
    assert cache_teacher.main(["--config", str(SMOKE), *common, f"teacher.cache={out}"]) == 2
    assert "already holds a teacher cache" in capsys.readouterr().err


def test_cached_values_equal_the_online_teacher(run, smoke_teacher):
    _, common, out = run
    cfg = stage_config(SMOKE, "stage3", common)
    batch, student = _batch(cfg, order=[5, 0, 3])  # any order, any size
    teacher, _, _ = load_checkpoint_model(smoke_teacher / "teacher_sft")
    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    vis = ids == student.image_token_id
    rows = response_mask(labels) | vis
    cached = open_cache(out).lookup(batch["ids"], ids, attn, labels, rows, "cpu")
    with torch.no_grad():
        logits = teacher.eval()(ids, attn, batch["pixel_values"]).logits
    logp = F.log_softmax(logits[rows].float(), dim=-1)
    online_top = logp.gather(1, cached.indices)
    torch.testing.assert_close(cached.logprobs, online_top, rtol=FP16_RTOL, atol=1e-6)
    # the stored tokens are the top k, and the leftover bucket holds exactly the rest of the mass
    torch.testing.assert_close(cached.logprobs[:, 0], logp.max(-1).values, rtol=FP16_RTOL, atol=1e-6)
    rest = torch.logsumexp(logp.scatter(1, cached.indices, float("-inf")), dim=-1)
    torch.testing.assert_close(cached.rest, rest, rtol=1e-5, atol=1e-5)
    # relation matrices: normalised Z_T Z_T^T in float16 -> entries within 2^-11 of the exact ones
    n = student.num_visual_tokens
    z = logits[vis].float().view(-1, n, logits.shape[-1])
    rel = z @ z.transpose(1, 2)
    rel = rel / rel.flatten(1).norm(dim=1)[:, None, None]
    assert cached.relation.shape == rel.shape == (3, n, n)
    assert (cached.relation - rel).abs().max() <= 2**-11
    # and RDist against them equals RDist against the exact ones to 1e-5 (any student relation)
    rel_s = torch.randn(3, n, 4)
    rel_s = rel_s @ rel_s.transpose(1, 2)
    assert abs(relation_loss_from_gram(rel_s, cached.relation) - relation_loss_from_gram(rel_s, rel)) < 1e-5


def test_bucketed_fkl_is_kl_over_topk_plus_the_leftover_bucket():
    torch.manual_seed(0)
    zs, zt = torch.randn(5, 50), torch.randn(5, 50) * 2
    lt, ls = F.log_softmax(zt, -1), F.log_softmax(zs, -1)
    top, idx = lt.topk(8, dim=-1)
    rest = torch.logsumexp(lt.scatter(1, idx, float("-inf")), -1)
    d = bucketed_divergence(zs, top, idx, rest, "fkl")
    p, q = top.exp(), ls.gather(1, idx).exp()
    p_rest, q_rest = rest.exp(), 1 - q.sum(-1)
    expected = (p * (p.log() - q.log())).sum(-1) + p_rest * (p_rest / q_rest).log()
    torch.testing.assert_close(d, expected, rtol=1e-5, atol=1e-6)
    # a lower bound of the full divergence for every kind, exact when the leftover is one token
    for kind in ("fkl", "rkl", "jsd", "skl", "srkl"):
        full = divergence_from_logprobs(ls, lt, kind)
        assert (bucketed_divergence(zs, top, idx, rest, kind) <= full + 1e-6).all()
        top49, idx49 = lt.topk(49, dim=-1)
        rest49 = torch.logsumexp(lt.scatter(1, idx49, float("-inf")), -1)
        torch.testing.assert_close(
            bucketed_divergence(zs, top49, idx49, rest49, kind), full, rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "skl", "srkl"])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_cached_loss_equals_its_reference(kind, bias):
    """cached_distill_loss (hidden states + head, chunked, closed-form gradients) == the logits reference."""
    torch.manual_seed(1)
    B, T, d, V, n, k = 2, 12, 8, 40, 4, 6
    h = torch.randn(B, T, d, requires_grad=True)
    w = (torch.randn(V, d) * 0.5).requires_grad_()
    b = torch.randn(V, requires_grad=True) if bias else None
    labels = torch.full((B, T), -100)
    labels[:, 7:10] = torch.randint(0, V, (B, 3))
    labels[1, 10] = 5
    vis = torch.zeros(B, T, dtype=torch.bool)
    vis[:, 1 : 1 + n] = True
    rows = response_mask(labels) | vis
    lt = F.log_softmax(torch.randn(int(rows.sum()), V) * 3, -1)
    top, idx = lt.topk(k, -1)
    rest = torch.logsumexp(lt.scatter(1, idx, float("-inf")), -1)
    rel = torch.randn(B, n, n)
    cached = CachedBatch(top, idx, rest, rel @ rel.transpose(1, 2))
    weights = {"ce": 1.0, "mdist_resp": 0.7, "mdist_vis": 1.3, "rdist": 0.5}
    settings = DistillSettings(kind=kind)

    total, terms = cached_distill_loss(
        h, w, labels, vis, n, cached, weights, settings, chunk_size=5, head_bias=b
    )
    grads = torch.autograd.grad(total, [h, w] + ([b] if bias else []))
    logits = F.linear(h, w, b)
    ref_total, ref_terms = cached_distill_loss_reference(logits, labels, vis, n, cached, weights, settings)
    ref_grads = torch.autograd.grad(ref_total, [h, w] + ([b] if bias else []))
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-6)
    assert terms.keys() == ref_terms.keys() == {"ce", "mdist_resp", "mdist_vis", "rdist"}
    for key in terms:
        torch.testing.assert_close(terms[key], ref_terms[key], rtol=1e-5, atol=1e-6)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_chunked_cached_loss_when_the_leftover_mass_underflows(kind):
    """A student so sure of the stored tokens that its leftover mass underflows float32 (exp(-150)): the
    closed form's direct sum of the rest is 0, and the chunk falls back to the reference's log-sum-exp."""
    torch.manual_seed(2)
    B, T, d, V, n, k = 2, 10, 8, 40, 3, 5
    h = torch.randn(B, T, d, requires_grad=True)
    w = (torch.randn(V, d) * 0.1).requires_grad_()
    b = torch.zeros(V)
    b[:k] = 150.0
    b.requires_grad_()
    labels = torch.full((B, T), -100)
    labels[:, 6:9] = torch.randint(0, k, (B, 3))
    vis = torch.zeros(B, T, dtype=torch.bool)
    vis[:, 1 : 1 + n] = True
    rows = int((response_mask(labels) | vis).sum())
    lt = F.log_softmax(torch.randn(rows, V), -1)
    idx = torch.arange(k).expand(rows, k).contiguous()
    rest = torch.logsumexp(lt[:, k:], -1)
    cached = CachedBatch(lt[:, :k], idx, rest, None)
    weights = {"ce": 1.0, "mdist_resp": 1.0, "mdist_vis": 1.0}
    settings = DistillSettings(kind=kind, rel=False)
    total, terms = cached_distill_loss(
        h, w, labels, vis, n, cached, weights, settings, chunk_size=4, head_bias=b
    )
    ref_total, ref_terms = cached_distill_loss_reference(
        F.linear(h, w, b), labels, vis, n, cached, weights, settings
    )
    assert torch.isfinite(ref_total) and ref_terms["mdist_vis"] > 1.0  # the leftover bucket dominates
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-6)
    for key in ("ce", "mdist_resp", "mdist_vis"):
        torch.testing.assert_close(terms[key], ref_terms[key], rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(total, [h, w, b])
    for g, rg in zip(grads, torch.autograd.grad(ref_total, [h, w, b])):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-6)


class _MatmulDtypes(TorchDispatchMode):
    """Records (operand shapes, dtype) of every matmul that runs inside the mode."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default):
            a, b = args[-2:] if func == torch.ops.aten.mm.default else args[1:3]
            self.seen.append((tuple(a.shape) + tuple(b.shape), a.dtype))
        return func(*args, **(kwargs or {}))


def _cached_problem(seed, d, V, n_resp, w_scale, relation, B=2, T=12, n=4, k=6):
    """Hidden states, head, labels (``n_resp`` response tokens from position 7), visual mask (``n`` tokens
    from position 1) and a random top-``k`` cached batch (+ relation matrices when ``relation``)."""
    torch.manual_seed(seed)
    h = torch.randn(B, T, d, requires_grad=True)
    w = (torch.randn(V, d) * w_scale).requires_grad_()
    labels = torch.full((B, T), -100)
    labels[:, 7 : 7 + n_resp] = torch.randint(0, V, (B, n_resp))
    vis = torch.zeros(B, T, dtype=torch.bool)
    vis[:, 1 : 1 + n] = True
    rows = int((response_mask(labels) | vis).sum())
    lt = F.log_softmax(torch.randn(rows, V) * 3, -1)
    top, idx = lt.topk(k, -1)
    rest = torch.logsumexp(lt.scatter(1, idx, float("-inf")), -1)
    rel = torch.randn(B, n, n) if relation else None
    return (
        h,
        w,
        labels,
        vis,
        n,
        CachedBatch(top, idx, rest, None if rel is None else rel @ rel.transpose(1, 2)),
    )


class _HeadSizedResults(TorchDispatchMode):
    """Names the ops that return a new tensor of ``numel`` elements (in-place ops, views and aliases aside)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in [*args, *(kwargs or {}).values()] if isinstance(a, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            new = isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in storages
            if new and t.numel() == self.numel:
                self.ops.append(func.overloadpacket.__name__)
        return out


def test_chunked_cached_loss_holds_one_head_sized_gradient():
    """With RDist on and the head training, forward + backward create one [V, d] tensor: the float32
    gradient that the chunks and RDist's share (through W^T W) accumulate into, handed to autograd as is."""
    d, V = 8, 97
    h, w, labels, vis, n, cached = _cached_problem(4, d, V, 3, w_scale=0.5, relation=True)
    weights = {"ce": 1.0, "mdist_resp": 1.0, "mdist_vis": 1.0, "rdist": 3.0}
    with _HeadSizedResults(V * d) as mode:
        total, terms = cached_distill_loss(
            h, w, labels, vis, n, cached, weights, DistillSettings(), chunk_size=5
        )
        total.backward()
    assert terms["rdist"] > 0 and w.grad is not None
    assert mode.ops == ["new_zeros"], mode.ops
    ref_total, _ = cached_distill_loss_reference(
        F.linear(h, w), labels, vis, n, cached, weights, DistillSettings()
    )
    ref_grad = torch.autograd.grad(ref_total, w)[0]
    torch.testing.assert_close(w.grad, ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rel_path", ["logits", "gram"])
def test_cached_loss_rdist_both_paths_equal_reference(rel_path, monkeypatch):
    """RDist from the visual logits or from W^T W: the same values and head / hidden gradients."""
    from mllm_kd.losses import kernel

    monkeypatch.setattr(kernel, "relation_from_logits", lambda rows, dim: rel_path == "logits")
    h, w, labels, vis, n, cached = _cached_problem(5, 16, 97, 3, w_scale=0.5, relation=True)
    h = h.detach().requires_grad_()
    weights = {"ce": 1.0, "mdist_resp": 1.0, "mdist_vis": 1.0, "rdist": 3.0}
    total, terms = cached_distill_loss(h, w, labels, vis, n, cached, weights, DistillSettings(), chunk_size=5)
    got = torch.autograd.grad(total, [h, w])
    ref_total, ref_terms = cached_distill_loss_reference(
        F.linear(h, w), labels, vis, n, cached, weights, DistillSettings()
    )
    want = torch.autograd.grad(ref_total, [h, w])
    assert terms["rdist"].item() == pytest.approx(ref_terms["rdist"].item(), rel=1e-5)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_chunked_cached_loss_under_bf16_autocast():
    """Under autocast every head matmul of the cached loss (logits and both gradient products) runs in
    bf16, like the logits path's lm_head and its backward; values and gradients match that reference."""
    V = 64
    h, w, labels, vis, n, cached = _cached_problem(3, 16, V, 4, w_scale=0.3, relation=False)
    rows = cached.logprobs.shape[0]
    weights = {"ce": 1.0, "mdist_resp": 1.0, "mdist_vis": 1.0}
    settings = DistillSettings(rel=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with _MatmulDtypes() as mode:
            total, terms = cached_distill_loss(h, w, labels, vis, n, cached, weights, settings, chunk_size=5)
        ref_total, ref_terms = cached_distill_loss_reference(
            F.linear(h, w), labels, vis, n, cached, weights, settings
        )
    head_matmuls = [dt for shape, dt in mode.seen if V in shape]
    assert len(head_matmuls) == 3 * -(-rows // 5)  # logits, grad_h, grad_W per chunk of 5 rows
    assert set(head_matmuls) == {torch.bfloat16}
    torch.testing.assert_close(total, ref_total, rtol=1e-2, atol=1e-3)
    for key in terms:
        torch.testing.assert_close(terms[key], ref_terms[key], rtol=1e-2, atol=1e-3)
    for g, rg in zip(torch.autograd.grad(total, [h, w]), torch.autograd.grad(ref_total, [h, w])):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, rg, rtol=5e-2, atol=5e-2 * rg.abs().max().item())


def test_relation_representations():
    torch.manual_seed(0)
    z = torch.randn(10, 30)
    rel = z @ z.t()
    exact = relation_from_values(relation_values(rel, 0), 10, 0)
    torch.testing.assert_close(exact, rel / rel.norm(), atol=2**-11, rtol=0)
    full_rank = relation_from_values(relation_values(rel, 10), 10, 10)
    torch.testing.assert_close(full_rank, rel / rel.norm(), atol=2e-3, rtol=0)
    cos = [
        F.cosine_similarity(
            relation_from_values(relation_values(rel, r), 10, r).flatten(), rel.flatten(), dim=0
        )
        for r in (3, 6)
    ]
    assert 0.8 < cos[0] < cos[1] < 0.999  # rank-r approximations of a rank-10 matrix


def _first_step(cfg):
    metrics = {}
    STAGES["stage3"].run(cfg, on_step=lambda step, m: metrics.setdefault(step, m))
    return metrics[1]


def test_stage3_with_a_cached_teacher_matches_the_online_teacher(run, tmp_path):
    """With k = V - 1 the leftover bucket is one token, so the bucketed divergence is the full one: the first
    step's terms equal the online teacher's up to the float16 rounding of the stored log-probabilities
    (relative 2^-11 of each log p: <= 1e-3 relative on MDist). RDist from the stored relation matrices is
    within 1e-4 of the online one; CE is the same computation."""
    _, common, _ = run
    out = tmp_path / "cache_full"
    vocab = open_cache(run[2]).manifest["built_for"]["vocab_size"]
    full = [*common, f"teacher.cache_topk={vocab - 1}", "train.max_steps=2"]
    assert cache_teacher.main(["--config", str(SMOKE), *full, f"teacher.cache={out}"]) == 0
    online = _first_step(stage_config(SMOKE, "stage3", [*full, f"output_dir={tmp_path}/online"]))
    cached = _first_step(
        stage_config(SMOKE, "stage3", [*full, f"output_dir={tmp_path}/cached", f"teacher.cache={out}"])
    )
    assert cached["ce"] == pytest.approx(online["ce"], rel=1e-6)
    assert cached["mdist_resp"] == pytest.approx(online["mdist_resp"], rel=1e-3, abs=1e-6)
    assert cached["mdist_vis"] == pytest.approx(online["mdist_vis"], rel=1e-3, abs=1e-6)
    assert cached["rdist"] == pytest.approx(online["rdist"], abs=1e-4)
    # the reference (logits) path against the cache gives the same values
    ref = _first_step(
        stage_config(
            SMOKE,
            "stage3",
            [*full, f"output_dir={tmp_path}/cached_ref", f"teacher.cache={out}", "loss.fused=false"],
        )
    )
    for key in ("ce", "mdist_resp", "mdist_vis", "rdist"):
        assert ref[key] == pytest.approx(cached[key], rel=1e-4, abs=1e-6)


def test_projected_images_in_the_cache_equal_the_online_teachers(run, smoke_teacher, tmp_path):
    """teacher.cache_projected_images keeps each image's projected tokens (float16), read back per sample in
    any batch order; a cache without them is rebuilt by the demo for a stage that needs them, and refused by
    a stage with loss.w_emb > 0."""
    from mllm_kd.teacher.cache import built_from

    _, common, plain = run
    out = tmp_path / "cache_emb"
    kept = [*common, "teacher.cache_projected_images=true"]
    assert cache_teacher.main(["--config", str(SMOKE), *kept, f"teacher.cache={out}"]) == 0
    cfg = stage_config(SMOKE, "stage3", common)
    batch, student = _batch(cfg, order=[5, 0, 3])
    teacher, _, _ = load_checkpoint_model(smoke_teacher / "teacher_sft")
    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    rows = response_mask(labels) | (ids == student.image_token_id)
    cached = open_cache(out).lookup(batch["ids"], ids, attn, labels, rows, "cpu")
    with torch.no_grad():
        visual = teacher.eval()(ids, attn, batch["pixel_values"]).visual
    assert cached.visual.shape == visual.shape == (3, student.num_visual_tokens, 64)  # the teacher's width
    torch.testing.assert_close(cached.visual, visual, rtol=FP16_RTOL, atol=1e-6)
    layout = json.loads((out / "manifest.json").read_text())["layout"]
    n_images = json.loads((out / "manifest.json").read_text())["stats"]["images"]
    assert layout["projected_images"]["shape"] == [n_images, student.num_visual_tokens, 64]
    assert (out / "projected_images.bin").stat().st_size == n_images * student.num_visual_tokens * 64 * 2
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    assert stats["bytes_per_image_projected"] == student.num_visual_tokens * 64 * 2
    plain_stats = json.loads((plain / "manifest.json").read_text())["stats"]
    assert stats["bytes_per_distilled_token"] == plain_stats["bytes_per_distilled_token"]  # counted apart
    # the fixture's cache keeps none: its lookups hold no projected images
    assert open_cache(plain).lookup(batch["ids"], ids, attn, labels, rows, "cpu").visual is None
    emb = stage_config(SMOKE, "stage3", [*common, "loss.w_emb=1"])
    assert built_from(plain, cfg) and not built_from(plain, emb) and built_from(out, emb)
    # refused before anything is written or removed: a finished stage redone with overwrite=true is kept
    s3 = [*common, f"teacher.cache={plain}", f"output_dir={tmp_path}/s3", "train.max_steps=1"]
    final = STAGES["stage3"].run(stage_config(SMOKE, "stage3", s3))
    weights = (final / "model.safetensors").read_bytes()
    refused = stage_config(SMOKE, "stage3", [*s3, "loss.w_emb=1", "overwrite=true"])
    with pytest.raises(ConfigError, match=r"does not keep: rebuild it with teacher\.cache_projected_images"):
        STAGES["stage3"].run(refused)
    assert (final / "model.safetensors").read_bytes() == weights


def test_stage3_projected_images_from_the_cache_match_the_online_teacher(run, tmp_path):
    """loss.w_emb against a cache that keeps the projected images: the first step's vemb is the online
    teacher's within the float16 rounding of the stored tokens (1e-3 relative), on the fused and the
    reference path; the cache is built with them because the stage's loss.w_emb > 0. The student is built
    at the teacher's width (the term needs one embedding space)."""
    _, common, _ = run
    wide = [
        *common,
        "init_from=null",
        "model.llm.config.hidden_size=64",
        "model.llm.config.intermediate_size=128",
        "model.llm.config.num_attention_heads=4",
        "model.llm.config.num_key_value_heads=2",
        "loss.w_emb=1",
        "train.max_steps=1",
    ]
    out = tmp_path / "cache_emb"
    assert cache_teacher.main(["--config", str(SMOKE), *wide, f"teacher.cache={out}"]) == 0
    assert "projected_images" in json.loads((out / "manifest.json").read_text())["layout"]
    online = _first_step(stage_config(SMOKE, "stage3", [*wide, f"output_dir={tmp_path}/online"]))
    for extra in ([], ["loss.fused=false"]):
        cached = _first_step(
            stage_config(
                SMOKE,
                "stage3",
                [*wide, *extra, f"output_dir={tmp_path}/cached{len(extra)}", f"teacher.cache={out}"],
            )
        )
        assert online["vemb"] > 0.1 and cached["vemb"] == pytest.approx(online["vemb"], rel=1e-3)
        assert cached["ce"] == pytest.approx(online["ce"], rel=1e-5)


def test_stage3_with_the_default_k_trains(run, tmp_path, caplog):
    """k=32 of a 352-token vocabulary: the run works and MDist is the bucketed (lower-bound) value."""
    _, common, out = run
    cfg = stage_config(
        SMOKE, "stage3", [*common, "train.max_steps=3", f"output_dir={tmp_path}/s3", f"teacher.cache={out}"]
    )
    steps = {}
    with caplog.at_level(logging.INFO, logger="mllm_kd.train"):
        final = STAGES["stage3"].run(cfg, on_step=lambda s, m: steps.setdefault(s, m))
    assert "student 0.05M parameters (trainable: vision 0.00M" in caplog.text
    assert f"distilling from the teacher cache {out}, device cpu" in caplog.text
    assert (final / "model.safetensors").is_file() and sorted(steps) == [1, 2, 3]
    assert all(steps[1][k] >= 0 for k in ("mdist_resp", "mdist_vis", "rdist"))


def _refused(cfg, match):
    with pytest.raises(CompatibilityError, match=match):
        STAGES["stage3"].run(cfg)
    assert not (Path(cfg.output_dir) / "final").exists()


def test_cache_for_other_settings_is_refused(run, tmp_path):
    _, common, out = run
    base = [*common, f"output_dir={tmp_path}/s3", f"teacher.cache={out}", "train.max_steps=1"]
    _refused(stage_config(SMOKE, "stage3", [*base, "data.max_length=100"]), r"data\.max_length: cache 128")
    _refused(
        stage_config(SMOKE, "stage3", [*base, "teacher.cache_topk=16"]), r"teacher\.cache_topk\): cache 32"
    )
    with pytest.raises(ConfigError, match=r"loss\.temperature"):
        STAGES["stage3"].run(stage_config(SMOKE, "stage3", [*base, "loss.temperature=2"]))


def test_cache_for_other_data_is_refused(run, tmp_path, smoke_teacher):
    _, common, out = run
    data = tmp_path / "data"
    shutil.copytree(smoke_teacher / "data", data)
    records = json.loads((data / "instruct.json").read_text())
    records[0]["conversations"][1]["value"] = "a changed answer"
    (data / "instruct.json").write_text(json.dumps(records))
    cfg = stage_config(
        SMOKE, "stage3", [*common, f"data_dir={data}", f"output_dir={tmp_path}/s3", f"teacher.cache={out}"]
    )
    _refused(cfg, r"data file \(SHA-256 of data.path\): cache")


def test_cache_for_another_tokenizer_is_refused(run, tmp_path, smoke_teacher):
    from mllm_kd.model.tokenization import load_tokenizer, train_bpe_tokenizer
    from mllm_kd.teacher.load import load_teacher

    _, common, out = run
    cfg = stage_config(SMOKE, "stage3", [*common, f"teacher.cache={out}"])
    student, tok, model_cfg = load_checkpoint_model(cfg.init_from)
    assert load_teacher(cfg, student, tok, model_cfg) is open_cache(out)  # the right one is accepted
    other = load_tokenizer(train_bpe_tokenizer(["some other text entirely"] * 10, tmp_path / "tok", 300))
    with pytest.raises(CompatibilityError, match="tokenizer vocabulary: cache"):
        load_teacher(cfg, student, other, model_cfg)


def test_samples_missing_from_the_cache_or_tokenised_differently_are_refused(run):
    _, common, out = run
    cfg = stage_config(SMOKE, "stage3", common)
    batch, student = _batch(cfg, n=2)
    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    rows = response_mask(labels) | (ids == student.image_token_id)
    cache = open_cache(out)
    with pytest.raises(CompatibilityError, match="is not in the teacher cache"):
        cache.lookup(["nope", batch["ids"][1]], ids, attn, labels, rows, "cpu")
    changed = labels.clone()
    changed[0, -1] = -100 if changed[0, -1] != -100 else 1
    with pytest.raises(CompatibilityError, match="tokenised differently"):
        cache.lookup(batch["ids"], ids, attn, changed, rows, "cpu")


def test_a_low_rank_relation_cache_approximates_rdist(run, tmp_path):
    """teacher.cache_relation_rank=r stores an n x r factor: smaller, and RDist close to the exact one."""
    _, common, exact = run
    cfg = stage_config(SMOKE, "stage3", common)
    batch, student = _batch(cfg, n=4)
    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    rows = response_mask(labels) | (ids == student.image_token_id)
    rels = {}
    for rank in (4, 16):
        out = tmp_path / f"rank{rank}"
        args = [*common, f"teacher.cache_relation_rank={rank}", f"teacher.cache={out}"]
        assert cache_teacher.main(["--config", str(SMOKE), *args]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["stats"]["bytes_per_image_relation"] == 2 * 16 * rank
        rels[rank] = open_cache(out).lookup(batch["ids"], ids, attn, labels, rows, "cpu").relation
    ref = open_cache(exact).lookup(batch["ids"], ids, attn, labels, rows, "cpu").relation
    for rank, tol in ((4, 1e-3), (16, 1e-5)):  # rank 16 = n_vis: exact up to float16 (measured: 8e-6, 0)
        cos = F.cosine_similarity(rels[rank].flatten(1), ref.flatten(1), dim=1)
        assert (1 - cos).max() < tol, (rank, cos)
