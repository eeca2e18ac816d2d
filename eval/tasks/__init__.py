"""The benchmark tasks, by the name the CLI takes (``--task``). Add a task by importing it here."""

from __future__ import annotations

from mllm_kd.errors import ConfigError
from mllm_kd.eval.core import Task
from mllm_kd.eval.tasks.easyvqa import EasyVQATask
from mllm_kd.eval.tasks.gqa import GQATask
from mllm_kd.eval.tasks.mmbench import MMBenchTask
from mllm_kd.eval.tasks.mme import MMETask
from mllm_kd.eval.tasks.pope import POPETask
from mllm_kd.eval.tasks.scienceqa import ScienceQATask
from mllm_kd.eval.tasks.textvqa import TextVQATask
from mllm_kd.eval.tasks.vizwiz import VizWizTask
from mllm_kd.eval.tasks.vqav2 import VQAv2Task

# Order is the column order of the report table.
TASKS: dict[str, type[Task]] = {
    "vqav2": VQAv2Task,
    "gqa": GQATask,
    "vizwiz": VizWizTask,
    "scienceqa": ScienceQATask,
    "textvqa": TextVQATask,
    "pope": POPETask,
    "mme": MMETask,
    "mmbench": MMBenchTask,
    "easyvqa": EasyVQATask,
}


def get_task(name: str) -> Task:
    """An instance of the task called ``name``; an unknown name is a ConfigError listing the known ones."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]()
