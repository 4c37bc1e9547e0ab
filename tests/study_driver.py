"""`deltatune compare` with each training child replaced by a fast, deterministic stand-in, so the
study's queueing, pruning, workers and recovery can be tested in seconds.

The stand-in's held-out accuracy depends only on the trial's parameters (best at lr 1e-3, a
little better with a larger LoRA rank), it reports a held-out evaluation every `eval_every`
steps like the trainer, and it stops when the pruner's watcher kills it. Every start and finish
is appended to ROOT/executions.log ("start JOB PID" / "finish JOB PID") so a test can count how
often each trial really ran.

    python tests/study_driver.py ROOT compare CONFIG [--join]   (as the CLI, in a subprocess)
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

STEP_S = float(os.environ.get("STUDY_DRIVER_STEP_S", "0.15"))


class FakeProcess:
    def __init__(self) -> None:
        self.killed = self.done = False

    def poll(self):
        return 0 if self.done or self.killed else None

    def kill(self) -> None:
        self.killed = True


def score_of(values: dict) -> float:
    lr = values["train"].get("lr") or 1e-3
    rank = values["method"].get("r") or 8
    return 0.55 + 0.35 * math.exp(-(math.log10(lr) + 3) ** 2) + 0.002 * rank


def _log(root: Path, line: str) -> None:
    with open(root / "executions.log", "a") as handle:
        handle.write(line + "\n")


def fake_run_method(root: Path):
    def run(values: dict, out_dir: Path, on_start=None) -> dict:
        run_dir = Path(values["output_dir"])
        job = run_dir.name
        partial = run_dir.parent / f".{run_dir.name}.partial"
        partial.mkdir(parents=True, exist_ok=True)
        (partial / "metrics.jsonl").write_text("")
        _log(root, f"start {job} {os.getpid()}")
        process = FakeProcess()
        if on_start is not None:
            on_start(process)
        target = score_of(values)
        train = values["train"]
        steps = train.get("max_steps") or 8
        every = train.get("eval_every")
        for step in range(1, steps + 1):
            time.sleep(STEP_S)
            if process.killed:
                return {"error": "killed by the pruner"}
            records = [{"step": step, "loss": 0.7 - 0.02 * step * target}]
            if every and step % every == 0:
                records.append({"step": step, "eval_accuracy": target * step / steps, "eval_loss": 1 - target})
            with open(partial / "metrics.jsonl", "a") as handle:
                handle.write("".join(json.dumps(r) + "\n" for r in records))
        time.sleep(STEP_S)  # the watcher sees the last evaluation before the run ends
        process.done = True
        summary = {"metric": "accuracy", "final_eval": {"accuracy": target, "loss": 1 - target},
                   "learned": True, "did_not_learn": None, "output_dir": str(run_dir),
                   "trainable_params": 1000 * (values["method"].get("r") or 1), "trainable_percent": 1.0,
                   "total_params": 100_000, "wall_time_s": 1.0, "time_per_step_s": 0.1, "tokens_per_s": 100.0,
                   "steps": steps, "peak_memory_bytes": 2 ** 20, "peak_memory_kind": "rss",
                   "saved_size_bytes": 2 ** 10, "lr": train.get("lr"), "train_examples": 48}
        (partial / "summary.json").write_text(json.dumps(summary))
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        partial.rename(run_dir)
        _log(root, f"finish {job} {os.getpid()}")
        return summary

    return run


def install(root: Path) -> None:
    """Replace the comparison's training child (and its memory plan) with the stand-in."""
    import deltatune.compare.plan as plan
    import deltatune.compare.runner as runner

    runner.run_method = fake_run_method(root)
    plan.plan_methods = lambda config, methods, per_method: []


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    install(Path(sys.argv[1]))
    from deltatune.cli import main

    sys.exit(main(sys.argv[2:]))
