"""Experiment tracking: TensorBoard and Weights & Biases, besides ``metrics.jsonl``.

Set in a recipe or on the command line (the ``log`` section of every stage)::

    log.tensorboard=true                 event files in <output_dir>/tensorboard (or <log.dir>/tensorboard)
    log.wandb=offline|online             a W&B run; offline needs no network (`wandb sync` uploads it later)
    log.project=mllm-kd log.run_name=... the W&B project and the run's name (default <run_dir name>-<stage>)

What is logged, at ``train.log_every``: each row of ``metrics.jsonl`` as ``train/<key>`` — the total loss and
every term (``ce``, ``mdist_resp``, ``mdist_vis``, ``rdist``), the learning rate of each parameter group
(``lr_projector``, ``lr_rest``), ``grad_norm``, ``tokens_per_s``, ``peak_mem_gb`` (CUDA) or ``peak_rss_gb``
(CPU), ``samples``, ``epoch`` — and the resolved config once (W&B: the run's config; TensorBoard: a text
``config``). Evaluation scores go to the same run as ``eval/<task>/<metric>`` (:func:`log_scores`: the demo,
and ``python -m mllm_kd.eval score --log-to STAGE_DIR``). Only rank 0 logs. ``tensorboard`` and ``wandb``
are the optional ``track`` extra; asking for one that is not installed is a :class:`ConfigError` before the
stage starts.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mllm_kd.config import LogConfig
from mllm_kd.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb-run-id.txt"  # in the tracking directory: a resumed stage continues the same W&B run
INSTALL_HINT = "install the `track` extra (pip install -e '.[track]') or just {pkg} (pip install {pkg})"


def check_available(cfg: LogConfig) -> None:
    """A clear error, before any work, when a requested tracker's package is not installed."""
    wanted = [("tensorboard", "log.tensorboard=true")] if cfg.tensorboard else []
    if cfg.wandb is not None:
        wanted.append(("wandb", f"log.wandb={cfg.wandb}"))
    for pkg, key in wanted:
        if importlib.util.find_spec(pkg) is None:
            raise ConfigError(f"{key} needs the {pkg} package: " + INSTALL_HINT.format(pkg=pkg))


class Tracker:
    """The trackers of one stage (or one evaluation), writing under ``directory``; a context manager that
    closes them. ``Tracker()`` is the one that logs nowhere (no tracker configured, or not rank 0)."""

    def __init__(
        self,
        cfg: LogConfig | None = None,
        directory: Path | None = None,
        run_name: str = "",
        config: dict | None = None,
        start_step: int = 0,
    ):
        self.tb = self.wandb_run = None
        if cfg is None or not cfg.enabled:
            return
        check_available(cfg)
        self.cfg, self.directory = cfg, Path(directory or ".")
        self.directory.mkdir(parents=True, exist_ok=True)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed stage drops the events logged after its checkpoint (as metrics.jsonl does)
            self.tb = SummaryWriter(
                str(self.directory / "tensorboard"), purge_step=start_step + 1 if start_step else None
            )
            if config is not None and not start_step:
                self.tb.add_text("config", "```yaml\n" + _yaml(config) + "```", 0)
        if cfg.wandb is not None:
            import wandb

            self.wandb_run = wandb.init(
                mode=cfg.wandb,
                project=cfg.project,
                entity=cfg.entity,
                name=run_name,
                id=_run_id(self.directory),
                resume="allow",
                dir=str(self.directory),
                config=config,
                settings=wandb.Settings(console="off", silent=True),
            )

    def log(self, metrics: dict[str, Any], step: int, wandb_step: bool = True) -> None:
        """Log the numeric values of ``metrics`` (keys as given) at ``step``; None and non-numbers skipped.

        ``wandb_step=False``: W&B numbers the row itself (a resumed run refuses steps it has passed)."""
        values = {
            k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb_run is not None and values:
            self.wandb_run.log(values, step=step if wandb_step else None)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _yaml(config: dict) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(config))


def _run_id(directory: Path) -> str:
    """The W&B run id of this directory: made once, read back when the stage resumes or is evaluated."""
    path = directory / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:8]
    path.write_text(run_id + "\n")
    return run_id


def default_run_name(cfg) -> str:
    return cfg.log.run_name or f"{Path(cfg.run_dir).name}-{cfg.stage}"


def tracking_dir(cfg) -> Path:
    return Path(cfg.log.dir or cfg.output_dir)


def open_stage_tracker(cfg, is_main: bool, start_step: int = 0) -> Tracker:
    """The tracker of a training stage (``cfg``: its :class:`~mllm_kd.config.StageConfig`); one that logs
    nowhere when no tracker is configured and on ranks other than 0."""
    if not (is_main and cfg.log.enabled):
        return Tracker()
    from dataclasses import asdict

    return Tracker(cfg.log, tracking_dir(cfg), default_run_name(cfg), _jsonable(asdict(cfg)), start_step)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


class StepMeter:
    """Counts the non-padding tokens trained on between two log rows, and reads peak memory."""

    def __init__(self, device: torch.device):
        self.device, self.tokens, self._elapsed = device, 0, 0.0

    def start(self, elapsed: float) -> None:
        """Count from ``elapsed`` seconds of training (a resumed stage's)."""
        self.tokens, self._elapsed = 0, elapsed

    def add(self, attention_mask: torch.Tensor) -> None:
        self.tokens += int(attention_mask.sum())

    def read(self, elapsed: float, world_size: int) -> dict[str, float]:
        """``tokens_per_s`` since the last read (training time ``elapsed`` in seconds; this process's count
        times ``world_size``) and the process's peak memory so far."""
        seconds = elapsed - self._elapsed
        out = {"tokens_per_s": round(self.tokens * world_size / seconds, 2) if seconds > 0 else None}
        self.tokens, self._elapsed = 0, elapsed
        if self.device.type == "cuda":
            import torch

            out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
            out["peak_rss_gb"] = round(rss / (2**30 if sys.platform == "darwin" else 2**20), 3)
        return out


def train_metrics(row: dict) -> dict:
    """A ``metrics.jsonl`` row as tracker keys (``train/<key>``), without the step itself."""
    return {f"train/{k}": v for k, v in row.items() if k != "step"}


# -------------------------------------------------------------------------------------- evaluation
def log_scores(stage_dir: str | Path, scores: dict, step: int | None = None) -> bool:
    """Log a score result (``{"task", "headline", <metrics>...}``, as ``eval score`` prints) to the trackers
    of the stage that made the checkpoint ``stage_dir`` (its ``config.yaml``'s ``log`` section), as
    ``eval/<task>/<metric>`` at the stage's last step. Returns False when that stage logged to no tracker."""
    from omegaconf import OmegaConf

    from mllm_kd.checkpoint.native import resolve_checkpoint

    ckpt = resolve_checkpoint(stage_dir, "--log-to")
    raw = OmegaConf.to_container(OmegaConf.load(ckpt / "config.yaml"))
    section = raw.get("log") or {}
    try:
        cfg = LogConfig(**section)
    except TypeError as e:
        raise ConfigError(f"{ckpt / 'config.yaml'}: invalid log section: {e}") from e
    if not cfg.enabled:
        return False
    if step is None:
        step = json.loads((ckpt / "trainer_state.json").read_text()).get("step", 0)
    name = cfg.run_name or f"{Path(raw['run_dir']).name}-{raw['stage']}"
    with Tracker(cfg, Path(cfg.dir or raw["output_dir"]), name) as tracker:
        tracker.log(_flatten(scores, f"eval/{scores.get('task', 'eval')}"), step, wandb_step=False)
    return True


def _flatten(d: dict, prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}/{k}"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}/{k}"] = float(v)
    return out
