"""What a user sees while `deltatune compare` runs: each child's progress live, and an ETA.

Each method trains in a child process whose stderr (tqdm bar, warnings, the one-line error) is
relayed to ours as it arrives, so a slow run can be told from a hung one; the last TAIL_CHARS
are kept for the one-line error of a child that fails. tqdm hides its bar when stderr is not a
terminal, and the child's stderr is our pipe, so when *our* stderr is a terminal the child is
told to show it anyway (PROGRESS_ENV, honoured by training/progress.py).

The comparison's ETA comes from measured time, not from the plan (the plan predicts memory and
each method's number of steps, not its speed): once a method has finished, the remaining
methods' planned steps times the finished methods' measured seconds per step, plus their
measured fixed cost (start, model load, evaluation, saving) per method.
"""
from __future__ import annotations

import codecs
import os
import shutil
import subprocess
import sys
from typing import IO, Callable

PROGRESS_ENV = "DELTATUNE_PROGRESS"  # "1": show the progress bar even on a pipe; "0": never
TAIL_CHARS = 4000


def child_env() -> dict[str, str]:
    """The environment of a child run: ours, plus a visible progress bar sized for our terminal."""
    env = dict(os.environ)
    if sys.stderr.isatty():
        env.setdefault(PROGRESS_ENV, "1")
        env.setdefault("COLUMNS", str(shutil.get_terminal_size().columns))
    return env


def run_relayed(command: list[str], env: dict[str, str] | None = None,
                out: IO[str] | None = None,
                on_start: Callable[[subprocess.Popen], None] | None = None) -> tuple[int, str]:
    """Run `command`, copying its stderr to `out` (default: our stderr) as it arrives.
    Returns (exit code, the last TAIL_CHARS of its stderr). `on_start` gets the child (the
    search watches a trial's progress and may stop it)."""
    out = out if out is not None else sys.stderr
    process = subprocess.Popen(command, stderr=subprocess.PIPE, env=env)
    if on_start is not None:
        on_start(process)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tail = ""
    try:
        # read1: whatever has arrived (a tqdm refresh ends in \r, not \n), never waiting for more
        while chunk := process.stderr.read1(65536):
            text = decoder.decode(chunk)
            out.write(text)
            out.flush()
            tail = (tail + text)[-TAIL_CHARS:]
        tail = (tail + decoder.decode(b"", final=True))[-TAIL_CHARS:]
        return process.wait(), tail
    except BaseException:  # Ctrl-C or a closed terminal: never leave a training child behind
        process.kill()
        process.wait()
        raise
    finally:
        process.stderr.close()


def last_line(tail: str, returncode: int) -> str:
    """The child's one-line error: its last non-empty line (progress refreshes split on \\r)."""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {returncode}"
