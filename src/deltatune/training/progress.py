"""What a run reports while it trains: metrics.jsonl, the trackers of `train.report_to`
(TensorBoard, MLflow, W&B: deltatune.tracking) and a progress bar.

Only rank 0 writes (the others get a silent RunLog). On resume, records after the checkpoint's
step are dropped from metrics.jsonl (and the trackers do likewise), so the log reads like one
uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from deltatune.tracking.base import Trackers

METRICS_FILE = "metrics.jsonl"


class RunLog:
    def __init__(self, run_dir: Path | None, total_steps: int, start_step: int = 0,
                 enabled: bool = True, trackers: Trackers | None = None) -> None:
        self.enabled = enabled and run_dir is not None
        self.bar = None
        self.trackers = trackers if trackers is not None and self.enabled else Trackers([])
        if not self.enabled:
            return
        self.path = Path(run_dir) / METRICS_FILE
        if start_step > 0:
            _truncate_after(self.path, start_step)
        self.file = open(self.path, "a", encoding="utf-8")
        from tqdm.auto import tqdm

        # disable=None: tqdm shows the bar on a terminal only; `compare`, whose children write
        # to a pipe it relays to the user's terminal, asks for it with DELTATUNE_PROGRESS=1
        force = os.environ.get("DELTATUNE_PROGRESS")
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        file=sys.stderr, disable={"1": False, "0": True}.get(force))

    def log(self, record: dict[str, Any]) -> None:
        """Append one record ({"step": N, ...}) to metrics.jsonl, then hand it to the trackers."""
        if not self.enabled:
            return
        clean = {k: _json_number(v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        self.trackers.log_metrics(clean, record["step"])

    def flush(self) -> None:
        """The trackers catch up with metrics.jsonl (before a checkpoint is written)."""
        self.trackers.flush()

    def advance(self, loss: float | None, tokens_per_s: float | None) -> None:
        if self.bar is None:
            return
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{loss:.4f}"
        if tokens_per_s is not None:
            postfix["tok/s"] = f"{tokens_per_s:,.0f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self, failed: bool = False) -> None:
        """Close the bar and metrics.jsonl; a failed run also closes its trackers (a finished
        one closes them in `finish`, once summary.json and the delta are written)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self.file.closed:
            self.file.close()
        if failed:
            self.trackers.finish(None, None, failed=True)

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        """The trackers get summary.json and the finished run directory, and are closed."""
        self.trackers.finish(summary, Path(run_dir))


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut short by the interruption
            continue
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
