"""The comparison's many training runs: reuse of finished runs, progress + ETA.

A job is one `deltatune train` child (a final run of one method, seed and data size; the
workers of compare/study.py take them from the study's queue). Its run directory is
`OUT/runs/JOB_ID`; the run trains into a partial directory and renames it at the end, so a `summary.json` there means the run finished. Beside it the comparison
keeps `OUT/jobs/JOB_ID/key.json`: the exact run config (paths inside OUT written relative to
it, so the record holds wherever OUT is mounted) and the training/eval files' size and content
fingerprint (`fingerprint`), written only after the run finished. Running the comparison again:
- a finished run whose key matches is reused (an interrupted comparison continues where it stopped);
- a finished run whose key differs is stale: refused with the first differing key, or rerun with
  --overwrite — never silently reused;
- an unfinished run is started again.
Touching or re-copying an identical data file keeps its runs; changing one byte makes them stale.
A key.json of an older deltatune recorded the files' modification time instead of a fingerprint:
it is still reused when the file's path, size and modification time are all unchanged (the file
cannot have changed since that run), and stale with a message saying why otherwise.
"""
from __future__ import annotations

import hashlib
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
OUTPUT_DIR = "{output_dir}"  # stands for the output directory in records (see portable)


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


# Files up to this size are hashed whole (SST-2's 4 MB train file: a few ms). A larger file is
# fingerprinted by its size plus a hash of its first and last MiB: an edit in the middle of a big
# file that keeps its size goes unnoticed, the price of not reading gigabytes for every job.
WHOLE_FILE_LIMIT = 64 * 1024 * 1024
SAMPLE = 1024 * 1024
_fingerprints: dict[tuple, str] = {}  # (path, size, mtime_ns) -> fingerprint: hashed once per process
_fingerprint_lock = threading.Lock()


def fingerprint(path: str | Path) -> str:
    """A hash of the file's content ("sha256:..."), or of its size and first and last MiB for a
    file over WHOLE_FILE_LIMIT ("sha256-ends:...")."""
    info = Path(path).stat()
    memo = (str(Path(path).resolve()), info.st_size, info.st_mtime_ns)
    with _fingerprint_lock:
        if memo in _fingerprints:
            return _fingerprints[memo]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if info.st_size <= WHOLE_FILE_LIMIT:
            for block in iter(lambda: handle.read(SAMPLE), b""):
                digest.update(block)
            found = "sha256:" + digest.hexdigest()
        else:
            digest.update(str(info.st_size).encode())
            digest.update(handle.read(SAMPLE))
            handle.seek(info.st_size - SAMPLE)
            digest.update(handle.read(SAMPLE))
            found = "sha256-ends:" + digest.hexdigest()
    # A file written within the last seconds may change again within the same mtime tick (coarse
    # on some filesystems) at the same size: not remembered, hashed again next time (as git does
    # for "racily clean" files).
    if time.time() - info.st_mtime > 2:
        with _fingerprint_lock:
            _fingerprints[memo] = found
    return found


def _stamp(path: str | None) -> dict | None:
    if not path or str(path).startswith("hf:") or not Path(path).exists():
        return None
    return {"path": str(path), "bytes": Path(path).stat().st_size, "fingerprint": fingerprint(path)}


def portable(value: Any, out_dir: Path) -> Any:
    """`value` with every path inside `out_dir` written as "{output_dir}/REL": a record that holds
    wherever the output directory is (another machine may mount it elsewhere)."""
    root = str(Path(out_dir).resolve())
    if isinstance(value, dict):
        return {k: portable(v, out_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, out_dir) for v in value]
    if isinstance(value, str) and (value == root or value.startswith(root + os.sep)):
        return OUTPUT_DIR + value[len(root):]
    return value


def local(value: Any, out_dir: Path) -> Any:
    """The reverse of `portable`, against this process's own output directory."""
    if isinstance(value, dict):
        return {k: local(v, out_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [local(v, out_dir) for v in value]
    if isinstance(value, str) and (value == OUTPUT_DIR or value.startswith(OUTPUT_DIR + "/")):
        return str(Path(out_dir).resolve()) + value[len(OUTPUT_DIR):]
    return value


def job_key(job: Job, out_dir: Path) -> dict:
    data = job.values["data"]
    key = {"config": job.values, "train_file": _stamp(data.get("train")), "eval_file": _stamp(data.get("eval"))}
    return portable(json.loads(json.dumps(key, default=str)), out_dir)


def _older_record(old: dict, new: dict) -> str | None:
    """For a key.json that stamped files by modification time: None when everything else matches
    and each file's path, size and mtime are unchanged since (so its content is too), else why not."""
    upgraded = dict(old)
    for name in ("train_file", "eval_file"):
        stamp, now = old.get(name), new.get(name)
        if isinstance(stamp, dict) and "mtime" in stamp:
            path = stamp.get("path")
            info = Path(path).stat() if path and Path(path).exists() else None
            if (info is None or now is None or now.get("path") != path or info.st_size != stamp.get("bytes")
                    or info.st_mtime != stamp["mtime"]):
                return (f"{name}: recorded by an older deltatune by its modification time, which has "
                        "changed since (content fingerprints are recorded from now on)")
            upgraded[name] = now
    return None if upgraded == new else _first_difference(upgraded, new)


def _first_difference(old: Any, new: Any, where: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
    return f"{where or 'value'}: {old!r} then, {new!r} now"


def _older_paths(record: dict) -> dict:
    """An older key.json named the run's directory as the config gave it, maybe relative to the
    working directory: made absolute, so that `portable` writes it relative to the output dir."""
    config = record.get("config") if isinstance(record, dict) else None
    if isinstance(config, dict) and isinstance(config.get("output_dir"), str) and \
            not Path(config["output_dir"]).is_absolute() and not config["output_dir"].startswith(OUTPUT_DIR):
        record = {**record, "config": {**config, "output_dir": str(Path(config["output_dir"]).resolve())}}
    return record


def finished_state(job: Job, out_dir: Path) -> tuple[str, str]:
    """("fresh" | "reuse" | "stale", why) for a job in an existing comparison directory."""
    run_dir = Path(job.values["output_dir"])
    key_path = out_dir / "jobs" / job.id / "key.json"
    if not (run_dir / SUMMARY).exists():
        return "fresh", ""
    if not key_path.exists():
        return "stale", "finished, but not by this comparison (no key.json)"
    old = portable(_older_paths(json.loads(key_path.read_text())), out_dir)
    new = job_key(job, out_dir)
    if old == new:
        return "reuse", ""
    if any(isinstance(old.get(k), dict) and "mtime" in old[k] for k in ("train_file", "eval_file")):
        why = _older_record(old, new)
        return ("reuse", "") if why is None else ("stale", why)
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
        key = json.dumps(job_key(job, out_dir), indent=1)
        tmp = out_dir / "jobs" / job.id / f"key.json.tmp-{os.getpid()}-{threading.get_ident()}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(key)
        os.replace(tmp, tmp.parent / "key.json")
    return summary


def progress_for(jobs: list[Job], out_dir: Path, workers: int, stage: str) -> Progress:
    # the ETA counts only the steps still to train: reused runs cost nothing
    to_train = sum(j.steps for j in jobs if finished_state(j, out_dir)[0] != "reuse")
    return Progress(len(jobs), to_train, workers, stage)
