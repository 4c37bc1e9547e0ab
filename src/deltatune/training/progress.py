"""What a run reports while it trains: metrics.jsonl, TensorBoard events and a progress bar.

Only rank 0 writes (the others get a silent RunLog). On resume, records after the checkpoint's
step are dropped from metrics.jsonl and TensorBoard, so the log reads like one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class RunLog:
    def __init__(self, run_dir: Path | None, total_steps: int, start_step: int = 0,
                 enabled: bool = True) -> None:
        self.enabled = enabled and run_dir is not None
        self.bar = None
        self.writer = None
        if not self.enabled:
            return
        self.path = Path(run_dir) / METRICS_FILE
        if start_step > 0:
            _truncate_after(self.path, start_step)
        self.file = open(self.path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR),
                                        purge_step=start_step + 1 if start_step else None)
        except ImportError:  # tensorboard is a declared dependency; a stripped install still trains
            self.writer = None
        from tqdm.auto import tqdm

        # disable=None: tqdm shows the bar on a terminal only; `compare`, whose children write
        # to a pipe it relays to the user's terminal, asks for it with DELTATUNE_PROGRESS=1
        force = os.environ.get("DELTATUNE_PROGRESS")
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        file=sys.stderr, disable={"1": False, "0": True}.get(force))

    def log(self, record: dict[str, Any]) -> None:
        """Append one record ({"step": N, ...}) to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        clean = {k: _json_number(v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(key.replace("eval_", "eval/", 1) if key.startswith("eval_")
                                           else f"train/{key}", value, record["step"])

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

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.file.close()


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
