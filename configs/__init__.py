"""The YAML recipes, installed with the library as ``mllm_kd.configs`` (package data): :func:`config_path`
finds one by name wherever the package is installed."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def config_path(name: str) -> Path:
    """The shipped recipe ``name`` (e.g. ``"easyvqa.yaml"``)."""
    return Path(str(files(__name__) / name))
