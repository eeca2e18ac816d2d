"""On-policy distillation (GKD) and sequence-level KD: generation, batch rewriting, the loss, resume."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import SMOKE, TINY_CLIP
from safetensors.torch import load_file

from mllm_kd.cli import stage_config
from mllm_kd.config import GenerationConfig, LLMConfig, LossConfig, ModelConfig, StageConfig, VisionConfig
from mllm_kd.errors import ConfigError
from mllm_kd.losses.fused import fused_kd_divergence
from mllm_kd.losses.reference import IGNORE_INDEX, divergence_from_logprobs, kd_divergence, response_mask
from mllm_kd.model.generate import sample_tokens
from mllm_kd.model.multimodal import build_model
from mllm_kd.stages import STAGES
from mllm_kd.train.objective import LossComputer
from mllm_kd.train.on_policy import ResponseSource, derived_seed, prompt_lengths, with_responses

VOCAB, IMG_ID, EOS, PAD = 120, 119, 2, 0


class Tokenizer:
    """What the response source reads of a tokenizer: EOS, padding, no ChatML end-of-turn token."""

    eos_token_id, pad_token_id, unk_token_id = EOS, PAD, 1

    def convert_tokens_to_ids(self, token):
        return self.unk_token_id


def _model(hidden: int, seed: int):
    llm = {
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
    }
    torch.manual_seed(seed)
    cfg = ModelConfig(vision=VisionConfig(config=dict(TINY_CLIP)), llm=LLMConfig(config=llm))
    return build_model(cfg, image_token_id=IMG_ID, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def models():
    return _model(32, seed=0), _model(48, seed=1).eval().requires_grad_(False)


def _batch(n_vis: int) -> dict:
    """Two right-padded samples: image + question + answer; the second has an earlier answered turn."""
    g = torch.Generator().manual_seed(0)
    rows, labels = [], []
    for b, (q, a) in enumerate([(5, 4), (3, 6)]):
        ids = [IMG_ID] * n_vis + torch.randint(3, IMG_ID, (q,), generator=g).tolist()
        lab = [IGNORE_INDEX] * len(ids)
        if b == 1:  # an earlier answer (supervised in the data set, part of the prompt when generating)
            ids += [7, 8, EOS, 9, 10]
            lab += [7, 8, EOS, IGNORE_INDEX, IGNORE_INDEX]
        answer = [*torch.randint(3, IMG_ID, (a,), generator=g).tolist(), EOS]
        rows.append(ids + answer)
        labels.append(lab + answer)
    T = max(len(r) for r in rows)
    input_ids = torch.full((2, T), PAD)
    lab_t = torch.full((2, T), IGNORE_INDEX)
    attn = torch.zeros(2, T, dtype=torch.long)
    for b, (r, lab) in enumerate(zip(rows, labels)):
        input_ids[b, : len(r)], lab_t[b, : len(r)], attn[b, : len(r)] = torch.tensor(r), torch.tensor(lab), 1
    return {
        "ids": ["a", "b"],
        "skipped": 0,
        "input_ids": input_ids,
        "labels": lab_t,
        "attention_mask": attn,
        "pixel_values": torch.randn(2, 3, 32, 32, generator=g),
    }


def _cfg(**loss) -> StageConfig:
    return StageConfig(
        loss=LossConfig(**loss), generation=GenerationConfig(max_new_tokens=6, temperature=1.5)
    )


# ------------------------------------------------------------------------------------------- JSD
def _textbook_jsd(zs, zt, beta):
    """GKD's generalised JSD in float64; at beta 0 and 1 the KLs it interpolates."""
    ps, pt = torch.softmax(zs.double(), -1), torch.softmax(zt.double(), -1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if beta == 0:
        return kl(pt, ps)
    if beta == 1:
        return kl(ps, pt)
    m = beta * pt + (1 - beta) * ps
    return beta * kl(pt, m) + (1 - beta) * kl(ps, m)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_reference_and_fused_equal_float64_textbook(beta):
    g = torch.Generator().manual_seed(3)
    hs, ws = torch.randn(9, 16, generator=g, requires_grad=True), torch.randn(40, 16, generator=g)
    ht, wt = torch.randn(9, 24, generator=g), torch.randn(40, 24, generator=g)
    zs64 = (hs.double() @ ws.double().t()).detach().requires_grad_()
    want = _textbook_jsd(zs64, ht.double() @ wt.double().t(), beta).mean()
    (want_grad,) = torch.autograd.grad(want, zs64)
    ref = kd_divergence(
        (hs @ ws.t())[None], (ht @ wt.t())[None], torch.ones(1, 9, dtype=torch.bool), "jsd", beta=beta
    )
    fused = fused_kd_divergence(hs, ws, ht, wt, "jsd", beta=beta, chunk_size=4)
    assert ref.item() == pytest.approx(want.item(), rel=1e-5)
    assert fused.item() == pytest.approx(want.item(), rel=1e-5)
    (got_h,) = torch.autograd.grad(fused, hs)
    torch.testing.assert_close(got_h.double(), want_grad @ ws.double(), rtol=1e-4, atol=1e-6)


def test_jsd_ends_are_the_scaled_limits():
    # JSD(beta) / beta -> KL(p_T || p_S) as beta -> 0 and JSD(beta) / (1 - beta) -> KL(p_S || p_T) as beta -> 1.
    g = torch.Generator().manual_seed(4)
    a = F.log_softmax(torch.randn(5, 30, generator=g).double(), -1)
    b = F.log_softmax(torch.randn(5, 30, generator=g).double(), -1)
    eps = 1e-6
    fkl, rkl = (
        divergence_from_logprobs(a, b, "jsd", beta=0.0),
        divergence_from_logprobs(a, b, "jsd", beta=1.0),
    )
    torch.testing.assert_close(divergence_from_logprobs(a, b, "jsd", beta=eps) / eps, fkl, rtol=1e-4, atol=0)
    torch.testing.assert_close(
        divergence_from_logprobs(a, b, "jsd", beta=1 - eps) / eps, rkl, rtol=1e-4, atol=0
    )
    torch.testing.assert_close(fkl, divergence_from_logprobs(a, b, "fkl"))
    assert (fkl - rkl).abs().max() > 1e-3


# ------------------------------------------------------------------------------------ generation
def test_prompt_lengths_and_with_responses(models):
    batch = _batch(models[0].num_visual_tokens)
    n_vis = models[0].num_visual_tokens
    lens = prompt_lengths(batch["labels"], batch["attention_mask"])
    assert lens == [n_vis + 5, n_vis + 3 + 5]  # the second keeps its earlier answer in the prompt
    out = with_responses(batch, lens, [torch.tensor([11, 12, EOS]), torch.tensor([13])], PAD)
    assert out["input_ids"].shape == (2, lens[1] + 1)
    assert out["input_ids"][0, : lens[0]].tolist() == batch["input_ids"][0, : lens[0]].tolist()
    assert out["labels"][0].tolist() == [IGNORE_INDEX] * lens[0] + [11, 12, EOS] + [IGNORE_INDEX] * (
        lens[1] - lens[0] - 2
    )
    assert out["labels"][1].tolist() == [IGNORE_INDEX] * lens[1] + [13]
    assert out["attention_mask"].sum(1).tolist() == [lens[0] + 3, lens[1] + 1]
    assert out["pixel_values"] is batch["pixel_values"] and out["ids"] == ["a", "b"]


def _reference_sampling(model, prompts, pixels, steps, temperature, generator):
    """No KV cache: the whole left-padded batch recomputed each step, the same draws."""
    T = max(len(p) for p in prompts)
    ids = torch.stack([F.pad(p, (T - len(p), 0), value=PAD) for p in prompts])
    attn = torch.stack([F.pad(torch.ones(len(p), dtype=torch.long), (T - len(p), 0)) for p in prompts])
    out = []
    for _ in range(steps):
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = model.llm(
            inputs_embeds=model.embed(ids, pixels), attention_mask=attn, position_ids=pos
        ).logits
        logits = logits[:, -1].float()
        logits[:, IMG_ID] = -float("inf")
        nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(1)
        out.append(nxt)
        ids, attn = (
            torch.cat([ids, nxt[:, None]], 1),
            torch.cat([attn, torch.ones(len(prompts), 1, dtype=torch.long)], 1),
        )
    return torch.stack(out, 1)


def test_sample_tokens_with_cache_equals_recomputation_and_is_seeded(models):
    student = models[0].eval()
    batch = _batch(student.num_visual_tokens)
    lens = prompt_lengths(batch["labels"], batch["attention_mask"])
    prompts = [batch["input_ids"][b, :n] for b, n in enumerate(lens)]
    with torch.no_grad():
        got = sample_tokens(
            student, prompts, batch["pixel_values"], 8, [], PAD, 1.5, torch.Generator().manual_seed(5)
        )
        want = _reference_sampling(
            student, prompts, batch["pixel_values"], 8, 1.5, torch.Generator().manual_seed(5)
        )
    assert [g.tolist() for g in got] == want.tolist()
    again = sample_tokens(
        student, prompts, batch["pixel_values"], 8, [], PAD, 1.5, torch.Generator().manual_seed(5)
    )
    other = sample_tokens(
        student, prompts, batch["pixel_values"], 8, [], PAD, 1.5, torch.Generator().manual_seed(6)
    )
    assert [a.tolist() for a in again] == [g.tolist() for g in got]
    assert [a.tolist() for a in other] != [g.tolist() for g in got]
    # a response ends with its first stop token; a stopped row does not hold the others back
    stop = int(got[0][2])
    cut = sample_tokens(
        student, prompts, batch["pixel_values"], 8, [stop], PAD, 1.5, torch.Generator().manual_seed(5)
    )
    first = got[0].tolist().index(stop)
    assert cut[0].tolist() == got[0][: first + 1].tolist()


def test_on_policy_choice_is_seeded_per_step_and_shared_by_ranks(models):
    student, teacher = models
    a = ResponseSource(_cfg(on_policy_fraction=0.3), student, teacher, Tokenizer(), rank=0)
    b = ResponseSource(_cfg(on_policy_fraction=0.3), student, teacher, Tokenizer(), rank=1)
    choices = [a.is_on_policy(s, k) for s in range(1, 301) for k in (1, 2)]
    assert choices == [b.is_on_policy(s, k) for s in range(1, 301) for k in (1, 2)]
    assert 0.24 < sum(choices) / len(choices) < 0.36
    cfg = _cfg(on_policy_fraction=0.3)
    cfg.train.seed = 1
    c = ResponseSource(cfg, student, teacher, Tokenizer())
    assert choices != [c.is_on_policy(s, k) for s in range(1, 301) for k in (1, 2)]
    assert derived_seed(0, 5, 1, 0, 1) != derived_seed(0, 5, 1, 1, 1)  # ranks draw different samples


# ------------------------------------------------------------------------------------------ loss
def test_fraction_zero_is_todays_loss(models):
    student, teacher = models
    assert ResponseSource.from_config(_cfg(), student, teacher, Tokenizer()) is None
    batch = _batch(student.num_visual_tokens)
    for fused in (True, False):
        fn = LossComputer(_cfg(fused=fused), teacher)
        total, terms = fn(student, batch)
        total_b, terms_b = fn(student, {**batch, "on_policy": False})
        assert total_b.item() == total.item()
        assert terms_b.pop("on_policy").item() == 0.0
        assert {k: v.item() for k, v in terms_b.items()} == {k: v.item() for k, v in terms.items()}
        assert set(terms) == {"ce", "mdist_resp", "mdist_vis", "rdist"}


@pytest.mark.parametrize("fused", [True, False])
def test_fraction_one_trains_on_student_samples_without_ce(models, fused):
    student, teacher = models
    cfg = _cfg(on_policy_fraction=1.0, fused=fused, kind="jsd", beta=0.3)
    source = ResponseSource.from_config(cfg, student, teacher, Tokenizer())
    batch = _batch(student.num_visual_tokens)
    new = source(batch, step=3, micro=1)
    lens = prompt_lengths(batch["labels"], batch["attention_mask"])
    # the student's own draws, from the generator derived from (seed, step, micro, rank)
    g = torch.Generator().manual_seed(derived_seed(0, 3, 1, 0, 1))
    prompts = [batch["input_ids"][b, :n] for b, n in enumerate(lens)]
    want = sample_tokens(student.eval(), prompts, batch["pixel_values"], 6, [EOS], PAD, 1.5, g)
    student.train()
    assert new["on_policy"] is True
    for b, n in enumerate(lens):
        assert new["input_ids"][b, :n].tolist() == batch["input_ids"][b, :n].tolist()
        assert new["labels"][b][new["labels"][b] != IGNORE_INDEX].tolist() == want[b].tolist()
    assert not torch.equal(
        new["labels"][:, : batch["labels"].shape[1]], batch["labels"][:, : new["labels"].shape[1]]
    )
    total, terms = LossComputer(cfg, teacher)(student, new)
    assert set(terms) == {"mdist_resp", "mdist_vis", "rdist", "on_policy"}  # no CE on student samples
    with torch.no_grad():
        zs = student(new["input_ids"], new["attention_mask"], new["pixel_values"]).logits
        zt = teacher(new["input_ids"], new["attention_mask"], new["pixel_values"]).logits
    mask = response_mask(new["labels"])
    assert mask.sum() == sum(len(w) for w in want)
    want_resp = kd_divergence(zs, zt, mask, "jsd", beta=0.3)
    assert terms["mdist_resp"].item() == pytest.approx(want_resp.item(), rel=1e-4)
    assert total.item() == pytest.approx(
        sum(terms[k].item() for k in ("mdist_resp", "mdist_vis", "rdist")), rel=1e-5
    )


def test_sequence_kd_trains_on_the_teachers_response(models):
    student, teacher = models
    cfg = _cfg(sequence_kd=True)
    cfg.generation.teacher_greedy = True
    source = ResponseSource.from_config(cfg, student, teacher, Tokenizer())
    batch = _batch(student.num_visual_tokens)
    new = source(batch, step=1, micro=1)
    lens = prompt_lengths(batch["labels"], batch["attention_mask"])
    prompts = [batch["input_ids"][b, :n] for b, n in enumerate(lens)]
    want = sample_tokens(teacher, prompts, batch["pixel_values"], 6, [EOS], PAD, greedy=True)
    assert new["on_policy"] is False
    for b in range(2):
        assert new["labels"][b][new["labels"][b] != IGNORE_INDEX].tolist() == want[b].tolist()
    _, terms = LossComputer(cfg, teacher)(student, new)
    assert set(terms) == {"ce", "mdist_resp", "mdist_vis", "rdist", "on_policy"}


def test_refusals(models, smoke_data):
    student, teacher = models
    with pytest.raises(ConfigError, match=r"teacher\.cache.*loss\.on_policy_fraction"):
        stage_config(
            SMOKE, "stage3", [f"run_dir={smoke_data}", "teacher.cache=/x", "loss.on_policy_fraction=0.5"]
        )
    with pytest.raises(ConfigError, match=r"loss\.on_policy_fraction must be in \[0, 1\]"):
        LossConfig(on_policy_fraction=1.5)
    with pytest.raises(ConfigError, match="teacher model"):
        ResponseSource.from_config(_cfg(on_policy_fraction=0.5), student, None, Tokenizer())
    with pytest.raises(ConfigError, match=r"loss\.w_resp"):
        ResponseSource.from_config(_cfg(on_policy_fraction=0.5, w_resp=0), student, teacher, Tokenizer())


# ---------------------------------------------------------------------------------- stage 3, resume
class Interrupt(Exception):
    pass


def test_on_policy_stage3_resumes_mid_epoch_with_the_same_weights(smoke_teacher, tmp_path):
    def cfg(run):
        return stage_config(
            SMOKE,
            "stage3",
            [
                f"run_dir={smoke_teacher}",
                f"output_dir={tmp_path / run}",
                "init_from=null",
                "train.batch_size=2",
                "train.max_steps=6",  # 8 batches an epoch: the interruption is mid-epoch
                "train.save_every=2",
                "loss.on_policy_fraction=0.5",
                "loss.sequence_kd=true",
                "generation.max_new_tokens=6",
            ],
        )

    full_metrics = {}
    full = STAGES["stage3"].run(cfg("a"), on_step=lambda s, m: full_metrics.__setitem__(s, m))

    def stop_at_5(step, metrics):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        STAGES["stage3"].run(cfg("b"), on_step=stop_at_5)
    resumed = {}
    final = STAGES["stage3"].run(cfg("b"), on_step=lambda s, m: resumed.__setitem__(s, m))
    assert sorted(resumed) == [5, 6]
    on = [full_metrics[s]["on_policy"] for s in sorted(full_metrics)]
    assert 0 < sum(on) < 6  # both kinds of step happened
    for s in (5, 6):
        assert resumed[s]["on_policy"] == full_metrics[s]["on_policy"]
        assert resumed[s]["loss"] == pytest.approx(full_metrics[s]["loss"], rel=1e-6)
    wa, wb = load_file(full / "model.safetensors"), load_file(final / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    rows = [json.loads(ln) for ln in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    assert [r["on_policy"] for r in rows] == on


@pytest.mark.slow
def test_bench_on_policy_prints_one_json_line():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "bench/on_policy.py", "--layers-scale", "0.05", "--batch", "2", "--steps", "1"]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["on_policy_step_s"] > result["generation_s"] > 0
    assert result["on_policy_vs_off"] == pytest.approx(
        result["on_policy_step_s"] / result["off_policy_step_s"], rel=0.01
    )
    assert result["mean_response_tokens"] <= 8
