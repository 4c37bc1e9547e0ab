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
from typing import IO

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
                out: IO[str] | None = None) -> tuple[int, str]:
    """Run `command`, copying its stderr to `out` (default: our stderr) as it arrives.
    Returns (exit code, the last TAIL_CHARS of its stderr)."""
    out = out if out is not None else sys.stderr
    process = subprocess.Popen(command, stderr=subprocess.PIPE, env=env)
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


def comparison_eta(finished: list[tuple[float, dict]], remaining_steps: list[int]) -> str:
    """One line: the time left for the methods not yet run, from the finished ones' measurements.

    `finished`: (wall seconds the child took, its summary) per finished method (failed ones are
    left out: they say nothing about speed); `remaining_steps`: each remaining method's planned
    optimizer steps.
    """
    if not remaining_steps:
        return ""
    measured = [(seconds, s) for seconds, s in finished if s.get("steps")]
    if not measured:
        return (f"ETA for {len(remaining_steps)} methods ({sum(remaining_steps)} steps planned): "
                "known once one has finished (the plan predicts steps, not speed)")
    per_step = sum(s["train_time_s"] for _, s in measured) / sum(s["steps"] for _, s in measured)
    fixed = sum(max(0.0, seconds - s["train_time_s"]) for seconds, s in measured) / len(measured)
    left = sum(fixed + steps * per_step for steps in remaining_steps)
    methods = "the remaining method" if len(remaining_steps) == 1 else \
        f"the {len(remaining_steps)} remaining methods"
    return (f"ETA for {methods}: ~{_duration(left)} (measured: "
            f"{per_step:.3g} s/step and {fixed:.0f} s fixed cost per method over "
            f"{len(measured)} finished; times the plan's {sum(remaining_steps)} steps)")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
