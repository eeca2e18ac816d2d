"""The demo's transfer set: training questions in no model's data, answered by the teacher
(:mod:`mllm_kd.teacher.label`): the students' DFT data in a run with one (demo ``--transfer-questions N``)."""

from __future__ import annotations

from pathlib import Path

from mllm_kd.apps.easyvqa.roles import Recipe, transfer_suffix
from mllm_kd.cli import stage_config
from mllm_kd.errors import ConfigError


def transfer_file(teacher_dir: Path, count: int) -> Path:
    """Where the demo keeps the teacher's answers to the transfer set (:func:`answer_transfer_set`)."""
    return teacher_dir / "transfer" / f"transfer{transfer_suffix(count)}.json"


def answer_transfer_set(
    run: Path,
    recipe: Recipe,
    overrides: list[str],
    teacher: Path,
    teacher_dir: Path,
    count: int,
) -> Path:
    """The transfer set: ``count`` questions taken from the training questions right after every model's own
    (the first N of ``stages.teacher_sft``, ``stage2`` and ``stage3``, which share one file), so they are in no model's training data; their labels dropped, the
    teacher's greedy answers written in their place (:func:`mllm_kd.teacher.label.label_records`), once per
    teacher (re-runs reuse the file)."""
    from mllm_kd.teacher.label import label_records, labelled_by, read_slice

    common = [f"data_dir={run / 'data'}", f"teacher_dir={teacher_dir}", *overrides]
    data = [stage_config(recipe.config, s, common).data for s in ("teacher_sft", "stage2", "stage3")]
    if len({d.path for d in data}) != 1 or any(d.max_samples is None for d in data):
        raise ConfigError(
            "the transfer set is taken from the SFT data after the questions the models train on: "
            "stages.teacher_sft, stage2 and stage3 need the same data.path and a data.max_samples each"
        )
    path, dft = Path(data[0].path), data[2]
    records = read_slice(path, max(d.max_samples for d in data), count)
    out = transfer_file(teacher_dir, count)
    if not labelled_by(out, teacher, records, where=str(path)):
        folder = dft.image_folder or path.parent
        label_records(teacher, records, folder, out, batch_size=128, where=str(path))
    return out
