"""The comparison's many training runs: reuse of finished runs, progress + ETA.

A job is one `deltatune train` child (a final run of one method, seed and data size; the
workers of compare/study.py take them from the study's queue). Its run directory is
`OUT/runs/JOB_ID`; the run trains into a partial directory and renames it at the end, so a `summary.json` there means the run finished. Beside it the comparison
keeps `OUT/jobs/JOB_ID/key.json`: the exact run config and the training/eval files' size and
modification time, written only after the run finished. Running the comparison again:
- a finished run whose key matches is reused (an interrupted comparison continues where it stopped);
- a finished run whose key differs is stale: refused with the first differing key, or rerun with
  --overwrite — never silently reused;
- an unfinished run is started again.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from deltatune.errors import DeltatuneError

SUMMARY = "summary.json"


@dataclass
class Job:
    id: str              # "search-lora-lr1e-03", "lora-s0", "lora-s1-n250"
    values: dict         # the full run config of the child
    steps: int           # expected optimizer steps (for the ETA)
    label: str           # what the progress line shows


def expected_steps(values: dict, rows: int | None) -> int:
    train = values["train"]
    if train.get("max_steps"):
        return int(train["max_steps"])
    per_epoch = math.ceil((rows or 1) / (train["batch_size"] * train.get("grad_accum", 1)))
    return max(1, math.ceil(per_epoch * float(train["epochs"])))


def _stamp(path: str | None) -> dict | None:
    if not path or str(path).startswith("hf:") or not Path(path).exists():
        return None
    info = Path(path).stat()
    return {"path": str(path), "bytes": info.st_size, "mtime": info.st_mtime}


def job_key(job: Job) -> dict:
    data = job.values["data"]
    return {"config": job.values, "train_file": _stamp(data.get("train")), "eval_file": _stamp(data.get("eval"))}


def _first_difference(old: Any, new: Any, where: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
    return f"{where or 'value'}: {old!r} then, {new!r} now"


def finished_state(job: Job, out_dir: Path) -> tuple[str, str]:
    """("fresh" | "reuse" | "stale", why) for a job in an existing comparison directory."""
    run_dir = Path(job.values["output_dir"])
    key_path = out_dir / "jobs" / job.id / "key.json"
    if not (run_dir / SUMMARY).exists():
        return "fresh", ""
    if not key_path.exists():
        return "stale", "finished, but not by this comparison (no key.json)"
    old = json.loads(key_path.read_text())
    new = json.loads(json.dumps(job_key(job), default=str))
    if old == new:
        return "reuse", ""
    return "stale", _first_difference(old, new)


def check_stale(jobs: list[Job], out_dir: Path, overwrite: bool) -> None:
    """Refuse (one line) when a finished run was made with other settings, unless --overwrite."""
    if overwrite:
        return
    for job in jobs:
        state, why = finished_state(job, out_dir)
        if state == "stale":
            raise DeltatuneError(f"{out_dir / 'runs' / job.id}: finished with other settings ({why}); "
                                 "pass --overwrite to rerun stale runs, or use another output_dir")


class Progress:
    """'run k of n: LABEL — ETA 12 min' from the steps done so far and the seconds they took."""

    def __init__(self, total_runs: int, total_steps: int, workers: int, stage: str) -> None:
        self.total_runs, self.total_steps, self.workers, self.stage = total_runs, total_steps, workers, stage
        self.started_runs = self.done_steps = 0
        self.seconds = 0.0
        self.lock = threading.Lock()

    def start(self, job: Job, reused: bool) -> None:
        with self.lock:
            self.started_runs += 1
            eta = self.eta()
            print(f"[{self.stage}] run {self.started_runs} of {self.total_runs}: {job.label}"
                  f"{' (reused: finished earlier with these settings)' if reused else ''}; ETA {eta}",
                  flush=True)

    def finish(self, job: Job, seconds: float) -> None:
        with self.lock:
            self.done_steps += job.steps
            self.seconds += seconds

    def eta(self) -> str:
        if not self.done_steps:
            return "after the first run"
        remaining = max(self.total_steps - self.done_steps, 0) * self.seconds / self.done_steps / self.workers
        return f"{remaining / 60:.0f} min" if remaining >= 90 else f"{remaining:.0f} s"


def run_job(job: Job, out_dir: Path, run_method: Callable[..., dict], progress: Progress, stage: str) -> dict:
    """One job's summary (or {"error": ...}): reused when it finished earlier with these settings."""
    state, _ = finished_state(job, out_dir)
    run_dir = Path(job.values["output_dir"])
    if state == "reuse":
        progress.start(job, reused=True)
        return json.loads((run_dir / SUMMARY).read_text())
    progress.start(job, reused=False)
    tick = time.time()
    # run_method writes the child's config under its second argument; one folder per job.
    summary = run_method(job.values, out_dir / "jobs" / job.id)
    progress.finish(job, time.time() - tick)
    outcome = f"failed: {summary['error']}" if "error" in summary else "done"
    print(f"[{stage}] {job.label}: {outcome} after {time.time() - tick:.0f} s", flush=True)
    if "error" not in summary:
        key = json.dumps(job_key(job), default=str, indent=1)
        tmp = out_dir / "jobs" / job.id / f"key.json.tmp-{os.getpid()}-{threading.get_ident()}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(key)
        os.replace(tmp, tmp.parent / "key.json")
    return summary


def progress_for(jobs: list[Job], out_dir: Path, workers: int, stage: str) -> Progress:
    # the ETA counts only the steps still to train: reused runs cost nothing
    to_train = sum(j.steps for j in jobs if finished_state(j, out_dir)[0] != "reuse")
    return Progress(len(jobs), to_train, workers, stage)
