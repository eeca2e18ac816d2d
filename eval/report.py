"""Gather the benchmark scores of several checkpoints into one markdown table.

Where scores live (the convention ``score --out`` and ``report`` share): ``RUN_DIR/eval/<task>.json``, each
the JSON object ``score`` prints::

    {"task": "gqa", "model_id": "student-dft", "headline": "accuracy", "accuracy": 61.9, ...}

``headline`` names the metric the table shows: a percentage for every task but MME, whose perception total
(out of 2000) is shown as is and scaled to 0-100 for the average. The table has a row per run (labelled by
``model_id``, plus the run folder when two runs share one), a column per benchmark and ``Avg``, the mean of
the row's benchmarks on the 0-100 scale (marked * when the row lacks some of the table's benchmarks).
JSON files there that are not score files (no ``task`` or no headline value, e.g. a submission) are skipped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from mllm_kd.errors import DataError
from mllm_kd.eval.core import read_json
from mllm_kd.eval.tasks import TASKS

TITLES = {
    "vqav2": "VQAv2",
    "gqa": "GQA",
    "vizwiz": "VizWiz",
    "scienceqa": "SQA-IMG",
    "textvqa": "TextVQA",
    "pope": "POPE",
    "mme": "MME-P",
    "mmbench": "MMBench",
    "easyvqa": "easy-VQA",
}


@dataclass
class RunScores:
    """One run's headline value per task, and each task's full-scale maximum (for the 0-100 average)."""

    run: Path
    model_id: str
    values: dict[str, float] = field(default_factory=dict)
    maxima: dict[str, float] = field(default_factory=dict)


def score_files(run: Path) -> list[Path]:
    """``RUN_DIR/eval/*.json`` oldest first (so a newer score of the same task wins); a .json path as is."""
    if run.is_file() and run.suffix == ".json":
        return [run]
    files = sorted((run / "eval").glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name))
    if not files:
        raise DataError(f"{run}: no score files (expected {run / 'eval'}/*.json, written by `score --out`)")
    return files


def collect(runs: list[Path]) -> list[RunScores]:
    out = []
    for run in runs:
        rs = RunScores(run, "")
        for f in score_files(run):
            obj = read_json(f, "score file")
            task = obj.get("task") if isinstance(obj, dict) else None
            key = obj.get("headline") if task else None
            if not isinstance(key, str) or not isinstance(obj.get(key), (int, float)):
                print(f"report: skipping {f} (not a score file)", file=sys.stderr)
                continue
            if task in rs.values:
                print(f"report: {run}: several {task} scores; using {f}", file=sys.stderr)
            rs.values[task] = float(obj[key])
            rs.maxima[task] = TASKS[task].headline_max if task in TASKS else 100.0
            rs.model_id = rs.model_id or str(obj.get("model_id") or "")
        out.append(rs)
    return out


def markdown_table(rows: list[RunScores]) -> str:
    """Rows of scores -> a markdown table (benchmarks in registry order, unknown tasks after)."""
    tasks = [t for t in TASKS if any(t in r.values for r in rows)]
    tasks += sorted({t for r in rows for t in r.values} - set(tasks))
    names = [r.model_id or r.run.name for r in rows]
    lines = [
        "| Model | " + " | ".join(TITLES.get(t, t) for t in tasks) + " | Avg |",
        "|---" * (len(tasks) + 2) + "|",
    ]
    for r, name in zip(rows, names, strict=True):
        label = f"{name} ({r.run})" if names.count(name) > 1 else name
        cells = [f"{r.values[t]:.1f}" if t in r.values else "–" for t in tasks]
        scaled = [100.0 * v / r.maxima[t] for t, v in r.values.items()]
        avg = (
            f"{sum(scaled) / len(scaled):.1f}" + ("*" if len(r.values) < len(tasks) else "")
            if scaled
            else "–"
        )
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {avg} |")
    notes = [
        "",
        "Avg: mean over the row's benchmarks, each on a 0-100 scale (MME-P: perception / 2000 * 100).",
    ]
    if any(len(r.values) < len(tasks) for r in rows):
        notes.append("*: the row lacks some benchmarks, so its Avg is not comparable with the others.")
    return "\n".join(lines + notes) + "\n"


def report(runs: list[Path]) -> str:
    return markdown_table(collect(runs))
