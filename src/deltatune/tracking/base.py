"""The interface every tracker implements, and the fan-out that keeps a failing one from
stopping a run.

A tracker receives what the run's own files already hold (config.yaml, metrics.jsonl,
summary.json, the final delta), so the files stay the source of truth: a tracker that fails
(its server down, its disk full) is warned about once, left out for the rest of the run, and
training goes on without losing anything.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

TRACKING_FILE = "tracking.json"   # in a run or comparison directory: which tracker run it is
# Files at the top of a finished run directory that are the run's record, not its delta.
RECORD_FILES = ("config.yaml", "summary.json", "metrics.jsonl", TRACKING_FILE)


class Tracker:
    """One destination for a run's numbers. Every method may raise: `Trackers` catches it.

    `start` opens (or, resuming, reopens) the tracker's run; `log_metrics` gets each
    metrics.jsonl record (it should not wait on a network or a database: it runs between
    optimizer steps); `flush` waits until they are sent; `finish` gets summary.json and the
    finished run directory."""

    name = "tracker"

    def start(self, run_dir: Path, config: dict, resume: bool) -> None:
        pass

    def log_metrics(self, record: dict[str, Any], step: int) -> None:
        pass

    def flush(self) -> None:
        """Everything logged so far has reached the tracker (called before each checkpoint, so a
        resume never finds the tracker behind the checkpoint it continues from)."""

    def finish(self, summary: dict[str, Any] | None, run_dir: Path | None, failed: bool) -> None:
        pass


class Trackers:
    """Every tracker of one run, called in turn; a tracker that raises is warned about and dropped."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.active = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.active)

    def names(self) -> list[str]:
        return [t.name for t in self.active]

    def _each(self, what: str, *args: Any) -> None:
        for tracker in list(self.active):
            try:
                getattr(tracker, what)(*args)
            except Exception as exc:  # noqa: BLE001 - any tracker failure must not stop training
                self.active.remove(tracker)
                reason = " ".join(str(exc).split())[:300] or type(exc).__name__
                print(f"warning: {tracker.name} stopped receiving this run ({what} failed: {reason}); "
                      "training goes on, and metrics.jsonl and summary.json keep everything",
                      file=sys.stderr, flush=True)

    def start(self, run_dir: Path, config: dict, resume: bool) -> None:
        self._each("start", run_dir, config, resume)

    def log_metrics(self, record: dict[str, Any], step: int) -> None:
        self._each("log_metrics", record, step)

    def flush(self) -> None:
        self._each("flush")

    def finish(self, summary: dict[str, Any] | None, run_dir: Path | None, failed: bool = False) -> None:
        self._each("finish", summary, run_dir, failed)
        self.active = []


# ---------------------------------------------------------------------------------- shared helpers
def flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}; lists and scalars are leaves."""
    if isinstance(values, dict):
        flat: dict[str, Any] = {}
        for key, value in values.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat if flat or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: values}


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a record (booleans and text left out), "step" excluded."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def metric_key(text: str) -> str:
    """A name every tracker accepts as a metric key (MLflow: letters, digits, _ - . space / :)."""
    return re.sub(r"[^A-Za-z0-9_\-. /:]", "_", text)


def read_ids(directory: Path) -> dict[str, Any]:
    path = Path(directory) / TRACKING_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_ids(directory: Path, name: str, ids: dict[str, Any]) -> None:
    """Record `name`'s run ids in directory/tracking.json (so a resume reopens the same run)."""
    path = Path(directory) / TRACKING_FILE
    values = {**read_ids(directory), name: ids}
    tmp = path.with_name(f".{TRACKING_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
