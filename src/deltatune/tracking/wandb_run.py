"""Weights & Biases, through its own client (`wandb.init`).

Its own settings apply as usual: WANDB_PROJECT (else "deltatune"), WANDB_MODE=offline (a run
directory to `wandb sync` later; nothing leaves the machine), WANDB_RUN_GROUP (`deltatune
compare` sets it to the comparison's name, so a comparison is one group), WANDB_DIR (else the
run directory: RUN_DIR/wandb/). Every metrics.jsonl record is logged at its step, summary.json's
numbers go to the run summary, the final delta is a `model` artifact. The run id is kept in
RUN_DIR/tracking.json and `--resume` continues that W&B run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from deltatune.tracking.base import RECORD_FILES, Tracker, flatten, numbers, read_ids, write_ids

DEFAULT_PROJECT = "deltatune"
MAX_TAG = 64  # W&B refuses longer tags


def init(run_dir: Path, name: str, run_id: str | None, job_type: str, config: dict,
         tags: list[str], group: str | None = None) -> Any:
    import wandb

    return wandb.init(project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT, name=name,
                      id=run_id, resume="allow", job_type=job_type, config=config, tags=tags,
                      group=group or os.environ.get("WANDB_RUN_GROUP") or None,
                      dir=os.environ.get("WANDB_DIR") or str(run_dir),
                      # console="off": the progress bar and messages stay ours, not wrapped
                      settings=wandb.Settings(console="off"))


class WandbRun(Tracker):
    name = "wandb"

    def __init__(self) -> None:
        self.run = None

    def start(self, run_dir: Path, config: dict, resume: bool) -> None:
        known = (read_ids(run_dir).get(self.name) or {}) if resume else {}
        method = str((config.get("method") or {}).get("name", ""))
        base = Path(str(config.get("model", ""))).name  # a preset name, or a directory's name
        tags = [t[:MAX_TAG] for t in (method, base) if t]
        self.run = init(run_dir, Path(config["output_dir"]).name, known.get("run_id"), "train",
                        flatten(config), tags)
        write_ids(run_dir, self.name, {"run_id": self.run.id, "project": self.run.project,
                                       "group": self.run.group or None})

    def log_metrics(self, record: dict[str, Any], step: int) -> None:
        self.run.log(numbers(record), step=step)

    def finish(self, summary: dict[str, Any] | None, run_dir: Path | None, failed: bool) -> None:
        if self.run is None:
            return
        if not failed:
            import wandb

            self.run.summary.update(numbers(flatten(summary or {})))
            delta = wandb.Artifact(f"{self.run.id}-delta", type="model")
            for path in sorted(Path(run_dir).iterdir()):
                if path.is_file() and not path.name.startswith(".") and path.name not in RECORD_FILES:
                    delta.add_file(str(path))
            self.run.log_artifact(delta)
        self.run.finish(exit_code=1 if failed else 0)
        self.run = None
