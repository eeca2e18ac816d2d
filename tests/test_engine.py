"""The training engine: exact resume, schedule, learning-rate groups, non-finite losses."""

import itertools
import json
import math

import pytest
import torch
from conftest import SMOKE
from safetensors.torch import load_file

from mllm_kd.cli import stage_config
from mllm_kd.errors import ConfigError, TrainingError
from mllm_kd.stages import STAGES
from mllm_kd.train.objective import LossComputer
from mllm_kd.train.optim import build_optimizer, cosine_with_warmup


class Interrupt(Exception):
    pass


def _cfg(run_dir, stage, *extra):
    return stage_config(SMOKE, stage, [f"run_dir={run_dir}", "train.batch_size=2", *extra])


@pytest.mark.parametrize("fused", ["null", "false"])  # the default (the fused kernel), torch's default
def test_resume_gives_the_same_next_step_loss_and_weights(smoke_teacher, tmp_path, fused):
    common = [
        f"optim.fused={fused}",
        "train.max_steps=6",
        "train.save_every=2",
        f"teacher.checkpoint={smoke_teacher}/teacher_sft",
        f"model.vision.checkpoint={smoke_teacher}/teacher_sft",
        f"model.tokenizer={smoke_teacher}/data/tokenizer",
        f"data_dir={smoke_teacher}/data",
    ]
    full_losses = {}
    full = STAGES["stage1"].run(
        _cfg(tmp_path / "a", "stage1", *common), on_step=lambda s, m: full_losses.__setitem__(s, m["loss"])
    )

    def stop_at_5(step, metrics):
        if step == 5:
            raise Interrupt

    cfg_b = _cfg(tmp_path / "b", "stage1", *common)
    with pytest.raises(Interrupt):
        STAGES["stage1"].run(cfg_b, on_step=stop_at_5)
    assert (tmp_path / "b/stage1/checkpoints/step-0000004/trainer_state.json").is_file()
    assert not (tmp_path / "b/stage1/final").exists()
    resumed = {}
    final = STAGES["stage1"].run(cfg_b, on_step=lambda s, m: resumed.__setitem__(s, m["loss"]))
    assert sorted(resumed) == [5, 6]  # continues at the step after the last checkpoint
    for step in (5, 6):
        assert resumed[step] == pytest.approx(full_losses[step], rel=1e-6)
    wa, wb = load_file(full / "model.safetensors"), load_file(final / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "b/stage1/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicated lines after the resume
    assert not (tmp_path / "b/stage1/checkpoints").exists() or not any(
        (tmp_path / "b/stage1/checkpoints").iterdir()
    )


def test_finished_stage_is_skipped_unless_overwrite(smoke_teacher):
    cfg = _cfg(smoke_teacher, "teacher_pt")
    final = cfg.output_dir + "/final/model.safetensors"
    before = (smoke_teacher / "teacher_pt/final/model.safetensors").stat().st_mtime_ns
    STAGES["teacher_pt"].run(cfg)
    assert (smoke_teacher / "teacher_pt/final/model.safetensors").stat().st_mtime_ns == before, final


def test_cosine_with_warmup_values():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = cosine_with_warmup(opt, total_steps=10, warmup_ratio=0.2, min_lr_ratio=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)  # 2 warm-up steps
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))


def test_fused_adamw_choice_and_values(smoke_teacher):
    """optim.fused: false keeps torch's default implementation, null and true take torch's fused kernel
    (null: also on a CPU), which gives the same parameters after a few steps (float32 rounding apart);
    not with the 8-bit AdamW."""
    from mllm_kd.checkpoint.native import load_checkpoint_model
    from mllm_kd.model.multimodal import apply_trainable

    params = {}
    for fused in ("false", "null", "true"):
        model, _, _ = load_checkpoint_model(smoke_teacher / "teacher_sft")
        cfg = _cfg(smoke_teacher, "stage2", "optim.lr=0.01", "optim.weight_decay=0.1", f"optim.fused={fused}")
        apply_trainable(model, cfg.trainable)
        opt = build_optimizer(model, cfg.optim)
        assert bool(opt.defaults["fused"]) == (fused != "false")
        gen = torch.Generator().manual_seed(0)
        for _ in range(4):
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        params[fused] = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    model, _, _ = load_checkpoint_model(smoke_teacher / "teacher_sft")
    apply_trainable(model, cfg.trainable)
    start = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    assert (params["true"] - start).abs().mean() > 1e-3  # the parameters moved (4 steps of lr 0.01)
    torch.testing.assert_close(params["true"], params["false"], rtol=0, atol=1e-6)
    assert torch.equal(params["true"], params["null"])
    with pytest.raises(ConfigError, match=r"optim\.fused"):
        _cfg(smoke_teacher, "stage2", "optim.name=adamw8bit", "optim.fused=true")


def test_projector_has_its_own_learning_rate(smoke_teacher):
    from mllm_kd.checkpoint.native import load_checkpoint_model
    from mllm_kd.model.multimodal import apply_trainable

    model, _, _ = load_checkpoint_model(smoke_teacher / "teacher_sft")
    cfg = _cfg(smoke_teacher, "stage2", "optim.lr=0.01", "optim.projector_lr=0.5", "optim.weight_decay=0.1")
    apply_trainable(model, cfg.trainable)
    opt = build_optimizer(model, cfg.optim)
    by_name = {}
    for g in opt.param_groups:
        by_name.setdefault(g["name"], set()).add(g["lr"])
        assert g["weight_decay"] == (0.1 if all(p.ndim >= 2 for p in g["params"]) else 0.0)
    assert by_name == {"projector": {0.5}, "rest": {0.01}}
    n_vision = sum(1 for _ in model.vision.parameters())
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(1 for _ in model.parameters()) - n_vision


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_loss(smoke_teacher, tmp_path, monkeypatch, policy):
    original = LossComputer.__call__
    calls = {"n": 0}

    def nan_on_third(self, student, batch):
        calls["n"] += 1
        total, terms = original(self, student, batch)
        if calls["n"] == 3:
            terms["rdist"] = torch.tensor(float("nan"))
            total = total + terms["rdist"]
        return total, terms

    monkeypatch.setattr(LossComputer, "__call__", nan_on_third)
    cfg = _cfg(
        tmp_path,
        "stage1",
        "train.max_steps=4",
        "train.save_every=2",
        f"loss.on_nonfinite={policy}",
        f"teacher.checkpoint={smoke_teacher}/teacher_sft",
        f"model.vision.checkpoint={smoke_teacher}/teacher_sft",
        f"data_dir={smoke_teacher}/data",
    )
    if policy == "raise":
        with pytest.raises(TrainingError, match=r"step 3: loss term 'rdist' is nan"):
            STAGES["stage1"].run(cfg)
        assert (tmp_path / "stage1/checkpoints/step-0000002").is_dir()  # the last good checkpoint is kept
        assert not (tmp_path / "stage1/final").exists()
    else:
        final = STAGES["stage1"].run(cfg)
        state = json.loads((final / "trainer_state.json").read_text())
        assert state["skipped_steps"] == 1 and state["step"] == 4


def test_attention_device_follows_training_device_and_precision(monkeypatch):
    import mllm_kd.runtime.plan as plan
    from mllm_kd.config import StageConfig, TrainConfig
    from mllm_kd.model.llm import attention_implementation

    def attention_device(train: TrainConfig) -> torch.device:
        return plan.plan_run(StageConfig(train=train)).attn_device

    assert attention_device(TrainConfig()).type == "cpu"  # this machine: SDPA
    monkeypatch.setattr(plan, "pick_device", lambda name, rank=0: torch.device("cuda"))
    # bf16 autocast on CUDA: "auto" may pick FlashAttention-2; fp32 on CUDA must not (flash-attn needs half precision)
    assert attention_device(TrainConfig(precision="auto")).type == "cuda"
    assert attention_device(TrainConfig(precision="fp32")).type == "cpu"
    assert attention_implementation("auto", attention_device(TrainConfig(precision="fp32"))) == "sdpa"


def test_precision_auto_never_picks_bf16_on_a_cpu(caplog):
    from mllm_kd.runtime.device import autocast_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("auto", cuda) is torch.bfloat16
    assert autocast_dtype("fp32", cuda) is None
    with caplog.at_level("WARNING"):
        assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert "slower than float32" in caplog.text
