"""The run directory: never half-written, never silently overwritten.

A run writes into `.NAME.partial/` beside `output_dir` (config.yaml, metrics.jsonl, TensorBoard
events, checkpoints/) and is renamed to `output_dir` only once the final delta and summary.json
are in it. `--resume` continues from the partial directory (or from a finished run's
checkpoints, e.g. to train further).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from deltatune.adapters_io import commit_directory, directory_size, save_adapter
from deltatune.config.run import RunConfig
from deltatune.training.checkpoints import CHECKPOINTS, latest_checkpoint
from deltatune.training.distributed import Distributed
from deltatune.errors import DeltatuneError

SUMMARY_FILE = "summary.json"


def partial_dir(final: Path) -> Path:
    return final.parent / f".{final.name}.partial"


def check_output_dir(final: Path, resume: bool, overwrite: bool) -> None:
    """Raise the one-line error a run would hit, before anything is loaded or written."""
    partial = partial_dir(final)
    if resume and overwrite:
        raise DeltatuneError(f"{final}: --resume continues the checkpoints that --overwrite would "
                             "delete; pass one of them")
    if resume:
        if latest_checkpoint(partial) is None and latest_checkpoint(final) is None:
            raise DeltatuneError(f"{final}: --resume found no checkpoint to continue from (looked "
                                 f"in {partial}/checkpoints and {final}/checkpoints); "
                                 "set train.save_every to write checkpoints")
        return
    if final.exists() and not overwrite:
        raise DeltatuneError(f"{final}: output directory already exists; pass --overwrite to "
                             "replace it (or --resume to continue its checkpoints)")
    if latest_checkpoint(partial) is not None and not overwrite:
        raise DeltatuneError(f"{final}: an interrupted run left checkpoints in {partial}; pass "
                             "--resume to continue it or --overwrite to start over")


_HELD: dict[str, int] = {}  # lock file -> how many nested holders in this process


def lock_path(final: Path) -> Path:
    return final.parent / f".{final.name}.lock"


@contextlib.contextmanager
def run_dir_lock(final: Path, rank: int = 0) -> Iterator[None]:
    """Rank 0 holds an exclusive flock on `.NAME.lock` beside output_dir (its pid inside) while
    the run writes; a second `train` or `--resume` on the same directory is refused, naming that
    pid. The kernel drops the lock when the holder dies, however it dies, so a stale file never
    blocks anyone. (torchrun workers outlive a SIGKILLed launcher: this is what stops a resume
    from racing them.)"""
    path = lock_path(final)
    if rank != 0 or str(path) in _HELD:
        _HELD[str(path)] = _HELD.get(str(path), 0) + (rank == 0)
        try:
            yield
        finally:
            if rank == 0:
                _HELD[str(path)] -= 1
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, final)
    _HELD[str(path)] = 1
    try:
        yield
    finally:
        del _HELD[str(path)]
        with contextlib.suppress(OSError):
            path.unlink()  # still locked: whoever opened it meanwhile sees a stale inode and retries
        os.close(fd)


def _acquire(path: Path, final: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DeltatuneError(f"{final}: another run (pid {holder}) is still writing to this "
                                 "output directory; wait for it to end, or stop that process "
                                 "first") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # the previous holder unlinked it between our open and our lock: again


def prepare_run_dir(final: Path, resume: bool, overwrite: bool, dist: Distributed) -> Path:
    """The partial directory this run writes into (rank 0 prepares it; the others wait)."""
    partial = partial_dir(final)
    error = None
    if dist.is_main:
        try:
            check_output_dir(final, resume, overwrite)
            if resume and latest_checkpoint(partial) is None:
                shutil.rmtree(partial, ignore_errors=True)
                os.rename(final, partial)  # continue a finished run's checkpoints
            elif not resume:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            if resume:
                discard_interrupted_writes(partial)
        except DeltatuneError as exc:
            error = str(exc)
    error = dist.broadcast(error)
    if error is not None:
        raise DeltatuneError(error)
    return partial


def discard_interrupted_writes(run_dir: Path) -> None:
    """Remove what a killed process left half-written: the temp directories (and temp files)
    of a checkpoint, `best` or the final delta. They were never renamed into place, so they are
    incomplete by construction, and the finished run must not carry them."""
    for parent in (run_dir, run_dir / CHECKPOINTS):
        if not parent.is_dir():
            continue
        for path in parent.iterdir():
            if path.name.startswith(".") and (".tmp-" in path.name or path.name == ".final"):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()


def finish_run_dir(partial: Path, final: Path, dist: Distributed) -> None:
    if dist.is_main:
        commit_directory(partial, final)
    dist.barrier()


def peak_memory() -> tuple[int, str]:
    """(bytes, what was measured): peak allocated GPU memory, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    high_water = _linux_high_water_rss()
    if high_water is not None:
        return high_water, "cpu_peak_rss"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu_peak_rss"


def _linux_high_water_rss() -> int | None:
    """VmHWM: the peak RSS of this process's own memory. Not ru_maxrss, which Linux carries
    across fork + exec: a child started by a large parent (`compare` after planning) would report
    the parent's size as its own peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def save_final(run_dir: Path, model: nn.Module, tokenizer: Any) -> int:
    """The final delta (adapter files, or a full model) at the top of run_dir; returns its size."""
    staging = run_dir / ".final"
    save_adapter(model, staging)
    size = directory_size(staging)
    for item in staging.iterdir():
        os.replace(item, run_dir / item.name)
    staging.rmdir()
    tokenizer.save_pretrained(str(run_dir))
    return size


def write_summary(run_dir: Path, model: nn.Module, tokenizer: Any, config: RunConfig,
                  facts: dict[str, Any], started: float, device: torch.device) -> dict[str, Any]:
    saved_size = save_final(run_dir, model, tokenizer)
    memory, memory_kind = peak_memory()
    summary = {
        "model": config.model, "task": config.task, "method": config.method,
        "output_dir": str(config.output_dir), **facts,
        "saved_size_bytes": saved_size,
        "peak_memory_bytes": memory, "peak_memory_kind": memory_kind,
        "device": str(device),
        "wall_time_s": round(time.time() - started, 2),
    }
    return rewrite_summary(run_dir, summary)


def rewrite_summary(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    text = json.dumps(summary, indent=2, default=_jsonable) + "\n"
    (run_dir / SUMMARY_FILE).write_text(text, encoding="utf-8")
    return json.loads(text)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (Path, torch.device)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
