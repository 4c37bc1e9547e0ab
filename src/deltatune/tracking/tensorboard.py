"""TensorBoard event files in RUN_DIR/tensorboard/ (train/loss, eval/accuracy, ...).

On resume, events after the checkpoint's step are purged, so the curves read like one run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from deltatune.tracking.base import Tracker, numbers

TENSORBOARD_DIR = "tensorboard"


class TensorBoard(Tracker):
    name = "tensorboard"

    def __init__(self, start_step: int = 0) -> None:
        self.start_step = start_step
        self.writer = None

    def start(self, run_dir: Path, config: dict, resume: bool) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a declared dependency; a stripped install still trains
            return
        self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR),
                                    purge_step=self.start_step + 1 if self.start_step else None)

    def log_metrics(self, record: dict[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key, value in numbers(record).items():
            tag = key.replace("eval_", "eval/", 1) if key.startswith("eval_") else f"train/{key}"
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def finish(self, summary: dict[str, Any] | None, run_dir: Path | None, failed: bool) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
