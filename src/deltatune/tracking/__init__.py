"""Experiment trackers: where a run's numbers go besides its own files (`train.report_to`).

    report_to: [tensorboard, mlflow, wandb]     # or none; default [tensorboard]

    trackers = open_trackers(config, run_dir, resume=False, start_step=0)
    trackers.log_metrics({"step": 1, "loss": 0.69, ...}, 1)     # every metrics.jsonl record
    trackers.finish(summary, run_dir)                          # summary.json and the delta

One file per tracker (tensorboard.py, mlflow_run.py, wandb_run.py), all behind the small
interface in base.py; the trainer knows only that interface, and only rank 0 opens trackers.
mlflow and wandb are optional extras: asking for one that is not installed is one line naming
the extra (`check_installed`), raised before anything is loaded. A comparison is one parent
run with a child run per training run (comparison.py).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from deltatune.config.run import TRACKERS
from deltatune.errors import DeltatuneError
from deltatune.tracking.base import Tracker, Trackers
# tracker -> (module it needs, the pip extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "deltatune"), "mlflow": ("mlflow", "deltatune[mlflow]"),
            "wandb": ("wandb", "deltatune[wandb]")}


def check_installed(report_to: list[str], key: str = "train.report_to") -> None:
    """One line naming the extra for a requested tracker whose package is missing."""
    for name in report_to:
        module, extra = PACKAGES[name]
        if name != "tensorboard" and not installed(module):
            raise DeltatuneError(f"{key}: {name} is not installed; pip install '{extra}' "
                                 f"(or drop {name} from {key})")


def installed(module: str) -> bool:
    """Without importing it (mlflow takes seconds); a module set to None in sys.modules counts
    as missing, as Python's import does."""
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def build(name: str, start_step: int) -> Tracker:
    if name == "tensorboard":
        from deltatune.tracking.tensorboard import TensorBoard

        return TensorBoard(start_step)
    if name == "mlflow":
        from deltatune.tracking.mlflow_run import MlflowRun

        return MlflowRun()
    if name == "wandb":
        from deltatune.tracking.wandb_run import WandbRun

        return WandbRun()
    raise DeltatuneError(f"train.report_to: unknown tracker {name!r} (expected: {', '.join(TRACKERS)})")


def open_trackers(config, run_dir: Path, *, resume: bool, start_step: int,
                  enabled: bool = True) -> Trackers:
    """The trackers `config.train.report_to` names, started on `run_dir` (none when not `enabled`:
    under torchrun only rank 0 reports)."""
    if not enabled:
        return Trackers([])
    names = list(config.train.report_to)
    check_installed(names)
    trackers = Trackers([build(name, start_step) for name in names])
    trackers.start(Path(run_dir), config.to_dict(), resume)
    return trackers
