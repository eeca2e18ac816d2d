"""The Hugging Face model card (``README.md``) that ``python -m mllm_kd.export`` writes next to the weights.

(Over 400 lines: most of it is the card's own text and its Hub header, kept next to what fills them.)

The card is read from the run, not typed by hand: the exported checkpoint's ``config.yaml`` and
``trainer_state.json``, then each earlier stage's through ``init_from`` (stage3 -> stage2 -> stage1), the
teacher's ``model.yaml`` and weights, and the score files of the run (``RUN_DIR/eval/*.json``, written by
``python -m mllm_kd.eval score --out``). It has the Hub's YAML header (``library_name: transformers``,
``pipeline_tag: image-text-to-text``, ``base_model``, ``license``, ``tags`` and, with scores, a
``model-index``), then how the student was made and the snippet that loads it.

``base_model`` and ``datasets`` in the header are Hub ids; a run built from local files has none, so they
come from ``--base-model`` / ``--dataset`` (the local origins are written in the body either way).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mllm_kd.config import DISTILL_WEIGHTS
from mllm_kd.errors import CheckpointError, DataError

log = logging.getLogger(__name__)

CARD = "README.md"
TAGS = ["llava", "multimodal", "image-text-to-text", "knowledge-distillation", "llava-kd", "mllm-kd"]
# The stages that run a teacher when their distillation weights are > 0 (stages/stage1.py and stage3.py pass
# distill=True to run_stage; stage2 and the teacher's stages train on labels whatever the loss section says).
DISTILLING_STAGES = ("stage1", "stage3")
LOSS_TERMS = (
    ("w_ce", "CE"),
    ("w_resp", "MDist_resp"),
    ("w_vis", "MDist_vis"),
    ("w_rel", "RDist"),
    ("w_emb", "projected images"),
    ("w_hidden", "hidden states"),
)


@dataclass
class StageRecord:
    """One stage of the student's history, as its checkpoint directory records it."""

    name: str
    directory: Path
    config: dict
    state: dict

    @property
    def distilled(self) -> bool:
        if self.name not in DISTILLING_STAGES:
            return False
        loss = self.config.get("loss", {})
        teacher = self.config.get("teacher", {})
        weights = [loss.get(k, 0) for k in DISTILL_WEIGHTS]
        return bool((teacher.get("checkpoint") or teacher.get("cache")) and any(w > 0 for w in weights))


@dataclass
class CardInfo:
    """What the card says, gathered from the run."""

    stages: list[StageRecord]
    teacher: dict | None
    scores: list[dict] = field(default_factory=list)
    base_models: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    license: str = "unknown"
    parameters: int | None = None


def _read_yaml(path: Path) -> dict:
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]
    except Exception as e:  # yaml errors carry the line number
        raise CheckpointError(f"cannot read {path}: {e}") from e


def stage_history(checkpoint: str | Path) -> list[StageRecord]:
    """The stages that made ``checkpoint``, oldest first, followed through each config's ``init_from``.

    A stage whose ``init_from`` no longer exists (moved, deleted) ends the history there, with a warning.
    """
    from mllm_kd.checkpoint.native import resolve_checkpoint

    records: list[StageRecord] = []
    seen: set[Path] = set()
    ckpt: Path | None = resolve_checkpoint(checkpoint, "--checkpoint")
    while ckpt is not None and ckpt.resolve() not in seen:
        seen.add(ckpt.resolve())
        if not (ckpt / "config.yaml").is_file():
            break  # e.g. a checkpoint written by hand or imported from HF LLaVA
        config = _read_yaml(ckpt / "config.yaml")
        state = json.loads((ckpt / "trainer_state.json").read_text())
        records.append(StageRecord(str(config.get("stage") or ckpt.parent.name), ckpt, config, state))
        parent = config.get("init_from")
        ckpt = None
        if parent:
            try:
                ckpt = resolve_checkpoint(parent)
            except CheckpointError:
                log.warning(
                    "model card: %s (init_from of %s) is gone; history ends there", parent, records[-1].name
                )
    return records[::-1]


def _weights_numel(weights: Path) -> int | None:
    from safetensors import safe_open

    if not weights.is_file():
        return None
    n = 0
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            shape = f.get_slice(key).get_shape()
            size = 1
            for d in shape:
                size *= d
            n += size
    return n


def describe_checkpoint_model(ckpt: Path) -> dict:
    """Architecture facts of an mllm_kd checkpoint: LLM family and size, vision tower, parameter count."""
    model = _read_yaml(ckpt / "model.yaml") if (ckpt / "model.yaml").is_file() else {}
    llm = (model.get("llm") or {}).get("config") or {}
    vision = model.get("vision") or {}
    vcfg = vision.get("config") or {}
    return {
        "path": str(ckpt),
        "llm": {k: llm.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")},
        "vision": vision.get("torchvision_model") or vcfg.get("model_type") or vision.get("backend"),
        "projector": (model.get("projector") or {}).get("type"),
        "parameters": _weights_numel(ckpt / "model.safetensors"),
    }


def find_teacher(stages: list[StageRecord]) -> dict | None:
    """The teacher of the last distilling stage: its checkpoint's facts, or the cache it was read from."""
    from mllm_kd.checkpoint.native import resolve_checkpoint

    for rec in reversed(stages):
        if not rec.distilled:
            continue
        teacher = rec.config.get("teacher", {})
        if teacher.get("checkpoint"):
            try:
                info = describe_checkpoint_model(resolve_checkpoint(teacher["checkpoint"]))
            except CheckpointError:
                info = {"path": teacher["checkpoint"], "missing": True}
        else:
            info = {"path": None}
        info["cache"] = teacher.get("cache")
        info["quantize"] = teacher.get("quantize")
        return info
    return None


def find_scores(run_dirs: list[Path], extra: list[Path] | None = None) -> list[dict]:
    """Score files (``{"task", "headline", <headline>: value, ...}``) in ``RUN_DIR/eval/`` and ``extra``.

    ``extra`` entries are score files or folders of them; a named file that is not a score file is an error.
    """
    found: dict[str, dict] = {}
    files: list[tuple[Path, bool]] = []
    for run in run_dirs:
        files += [(f, False) for f in sorted((run / "eval").glob("*.json"), key=lambda p: p.stat().st_mtime)]
    for item in extra or []:
        if item.is_dir():
            files += [(f, False) for f in sorted(item.glob("*.json"), key=lambda p: p.stat().st_mtime)]
        elif item.is_file():
            files.append((item, True))
        else:
            raise DataError(f"--eval-results {item} does not exist")
    for f, named in files:
        try:
            obj = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            if named:
                raise DataError(f"--eval-results {f}: not valid JSON ({e})") from e
            continue
        key = obj.get("headline") if isinstance(obj, dict) and obj.get("task") else None
        if not isinstance(key, str) or not isinstance(obj.get(key), (int, float)):
            if named:
                raise DataError(f"--eval-results {f}: not a score file (needs task, headline and its value)")
            continue
        found[obj["task"]] = {
            "task": obj["task"],
            "metric": key,
            "value": float(obj[key]),
            "model_id": obj.get("model_id") or "",
            "n": obj.get("n") or obj.get("total") or obj.get("questions"),
            "file": str(f),
        }
    return list(found.values())


def gather(
    checkpoint: str | Path,
    *,
    base_models: list[str] | None = None,
    datasets: list[str] | None = None,
    license: str | None = None,
    eval_results: list[Path] | None = None,
) -> CardInfo:
    """Everything the card says about ``checkpoint`` (a checkpoint or a finished stage directory)."""
    from mllm_kd.checkpoint.native import resolve_checkpoint

    stages = stage_history(checkpoint)
    run_dirs = list(dict.fromkeys(Path(r.config["run_dir"]) for r in stages[-1:] if r.config.get("run_dir")))
    info = CardInfo(
        stages=stages,
        teacher=find_teacher(stages),
        scores=find_scores(run_dirs, eval_results),
        base_models=list(base_models or []),
        datasets=list(datasets or []),
        license=license or "unknown",
        parameters=_weights_numel(resolve_checkpoint(checkpoint) / "model.safetensors"),
    )
    return info


# ------------------------------------------------------------------------------------------- render
def _loss_words(rec: StageRecord) -> str:
    loss = rec.config.get("loss", {})
    distilled = rec.distilled
    parts = []
    for key, name in LOSS_TERMS:
        w = loss.get(key, 1.0 if key == "w_ce" else 0.0)
        if w and (key == "w_ce" or distilled):
            parts.append(name if w == 1 else f"{w:g} {name}")
    words = " + ".join(parts) or "none"
    if distilled and any(loss.get(k, 0) for k, _ in LOSS_TERMS[1:3]):
        kind = loss.get("kind", "fkl")
        words += f" (MDist: {kind}, tau={loss.get('temperature', 1.0):g})"
    if distilled and loss.get("w_resp", 0) and loss.get("resp_where_teacher_right"):
        words += "; MDist_resp only at answer tokens the teacher gets right"
    return words


def _trained_words(config: dict) -> str:
    trainable = config.get("trainable", {})
    parts = [f"{p} ({m})" if m != "full" else p for p, m in trainable.items() if m != "frozen"]
    words = ", ".join(parts) or "nothing"
    if trainable.get("llm") == "lora":
        lora = config.get("lora") or {}
        words += f"; LoRA r={lora.get('r')}, alpha={lora.get('alpha')}"
        if lora.get("quantize"):
            words += f", {lora['quantize']} base (QLoRA)"
    return words


def _data_words(rec: StageRecord) -> str:
    data = rec.config.get("data", {})
    words = f"`{data.get('path')}`"
    if data.get("max_samples"):
        words += f" (first {data['max_samples']})"
    return words


def _lr_words(config: dict) -> str:
    optim = config.get("optim", {})
    words = f"{optim.get('lr'):g}" if optim.get("lr") is not None else "?"
    if optim.get("projector_lr") is not None:
        words += f" (projector {optim['projector_lr']:g})"
    return words


def _samples(state: dict) -> str:
    if "samples" not in state:
        return "?"
    return str(state["samples"] * state.get("world_size", 1))  # `samples` counts one process's


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.1f}M" if n >= 1e7 else f"{n:,}"


def _yaml_header(info: CardInfo, name: str) -> str:
    header: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "image-text-to-text",
        "license": info.license,
        "tags": TAGS
        + (["lora"] if any(r.config.get("trainable", {}).get("llm") == "lora" for r in info.stages) else []),
    }
    if info.base_models:
        header["base_model"] = info.base_models
    if info.datasets:
        header["datasets"] = info.datasets
    if info.scores:
        header["model-index"] = [
            {
                "name": name,
                "results": [
                    {
                        "task": {"type": "visual-question-answering"},
                        "dataset": {"name": s["task"], "type": s["task"]},
                        "metrics": [{"type": s["metric"], "value": s["value"]}],
                    }
                    for s in info.scores
                ],
            }
        ]
    return "---\n" + OmegaConf.to_yaml(OmegaConf.create(header)) + "---\n"


def render(info: CardInfo, name: str) -> str:
    """The card's markdown text (YAML header included)."""
    last = info.stages[-1] if info.stages else None
    lines = [_yaml_header(info, name), f"# {name}", ""]
    distilled = [r.name for r in info.stages if r.distilled]
    lines.append(
        f"A multimodal LLM (vision tower -> projector -> LLM, Hugging Face LLaVA layout) of {_size(info.parameters)} "
        "parameters, "
        + (
            "distilled from a larger teacher with [mllm-kd](https://arxiv.org/abs/2410.16236) (LLaVA-KD: "
            f"distillation in {', '.join(distilled)})."
            if distilled
            else "trained with mllm-kd without distillation."
        )
    )
    lines += ["", "## How it was made", ""]
    if info.teacher is not None:
        t = info.teacher
        if t.get("path") and not t.get("missing"):
            llm = t["llm"]
            lines.append(
                f"**Teacher**: `{t['path']}`, {_size(t['parameters'])} parameters: {t['vision']} vision tower, "
                f"{t['projector']} projector, {llm['model_type']} LLM ({llm['num_hidden_layers']} layers, hidden "
                f"size {llm['hidden_size']})"
                + (f", run in {t['quantize']}" if t.get("quantize") else "")
                + "."
            )
        elif t.get("path"):
            lines.append(f"**Teacher**: `{t['path']}` (no longer there when this card was written).")
        if t.get("cache"):
            lines.append(f"Its outputs were read from the teacher cache `{t['cache']}`.")
        lines.append("")
    if last is not None:
        model = last.config.get("model", {})
        llm = model.get("llm", {}) or {}
        origin = llm.get("path") or "built from a config (random initialisation)"
        if llm.get("gguf_file"):
            origin += f" (GGUF `{llm['gguf_file']}`)"
        lines.append(
            f"**Student LLM** at the start: {origin}"
            + (f", keeping decoder layers {llm['keep_layers']}" if llm.get("keep_layers") else "")
            + "."
        )
        if info.base_models:
            lines.append(f"Base models: {', '.join(info.base_models)}.")
        lines.append("")
    if info.stages:
        lines += [
            "| stage | trained | loss | data | steps | samples | peak LR |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in info.stages:
            lines.append(
                f"| {r.name} | {_trained_words(r.config)} | {_loss_words(r)} | {_data_words(r)} | "
                f"{r.state.get('step', '?')} | {_samples(r.state)} | {_lr_words(r.config)} |"
            )
        lines += [
            "",
            "Loss terms: CE, the next-token cross-entropy; MDist, the divergence between teacher and student "
            "vocabulary distributions at the response (`_resp`) and visual (`_vis`) positions; RDist, "
            "`1 - cos` between their relation matrices of the visual tokens' logits. The vision tower and the "
            "teacher stay frozen.",
            "",
        ]
    lines += ["## Evaluation", ""]
    if info.scores:
        lines += ["| benchmark | metric | value | model id |", "|---|---|---|---|"]
        for s in info.scores:
            lines.append(f"| {s['task']} | {s['metric']} | {s['value']:.2f} | {s['model_id']} |")
        lines += ["", "Scored by `python -m mllm_kd.eval score` (the official scorers' rules, see its docs)."]
    else:
        lines.append("No evaluation results were found in the run (`RUN_DIR/eval/*.json`).")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from PIL import Image",
        "from transformers import AutoProcessor, LlavaForConditionalGeneration",
        "",
        f'model = LlavaForConditionalGeneration.from_pretrained("{name}")',
        f'processor = AutoProcessor.from_pretrained("{name}")',
        'image = Image.open("image.png")',
        "conv = [",
        '    {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What shape?"}]}',
        "]",
        "inputs = processor.apply_chat_template(",
        '    conv, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"',
        ")",
        "out = model.generate(**inputs, max_new_tokens=16)  # greedy, stops at the end of the turn",
        'print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    checkpoint: str | Path,
    out: str | Path,
    *,
    base_models: list[str] | None = None,
    datasets: list[str] | None = None,
    license: str | None = None,
    eval_results: list[Path] | None = None,
) -> Path:
    """Write ``out/README.md`` for the export of ``checkpoint``; returns its path."""
    info = gather(
        checkpoint, base_models=base_models, datasets=datasets, license=license, eval_results=eval_results
    )
    path = Path(out) / CARD
    path.write_text(render(info, Path(out).name), encoding="utf-8")
    return path


def add_card_arguments(p) -> None:
    """The model-card options of ``python -m mllm_kd.export``."""
    p.add_argument(
        "--base-model",
        action="append",
        default=[],
        metavar="HUB_ID",
        help="the card's base_model (a Hub id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct; repeatable)",
    )
    p.add_argument(
        "--dataset", action="append", default=[], metavar="HUB_ID", help="the card's datasets (repeatable)"
    )
    p.add_argument(
        "--license",
        default=None,
        help="the card's license (a Hub licence id, e.g. apache-2.0; default unknown)",
    )
    p.add_argument(
        "--eval-results",
        action="append",
        default=[],
        type=Path,
        metavar="FILE_OR_DIR",
        help="score files (eval score --out) for the card, besides RUN_DIR/eval/*.json (repeatable)",
    )


def card_options(args) -> dict:
    return {
        "base_models": args.base_model,
        "datasets": args.dataset,
        "license": args.license,
        "eval_results": args.eval_results,
    }
