"""What logging to MLflow at every step costs: the MiniLM example with `report_to: none` and
`report_to: [mlflow]` (the local SQLite store), taking turns in one process.

    python benchmarks/training/tracking_cost.py [--steps 40] [--rounds 3] [--out PATH]

Each run is examples/sst2-minilm-lora.yaml for `--steps` optimizer steps at `log_every: 1`
(no evaluation, no checkpoints, the first `--steps` x 32 training rows). A step's time is the
wall time between two consecutive `on_step` calls, so it includes writing metrics.jsonl and
handing the record to the trackers; the first WARMUP steps of each run are not counted. The
variants alternate, `off` first, round after round, so machine noise hits both alike; the
first round only warms up (imports, the SQLite store's creation) and is not counted. Also
measured directly, free of machine noise: the time the training thread spends inside the
trackers' `log_metrics`, and the CPU time of MLflow's background sender thread per step.
Printed and written as JSON: the median step of each variant, their ratio, the direct cost.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
from common.machine import ROOT, cpu_flags, describe, write_result

EXAMPLE = ROOT / "examples" / "sst2-minilm-lora.yaml"
WARMUP = 3
VARIANTS = {"off": "none", "on": "[mlflow]"}


def one_run(out: Path, steps: int, report_to: str, in_trackers: list[float]) -> tuple[list[float], dict]:
    from deltatune.training.loop import train_from_config

    ticks: list[float] = []
    overrides = [f"train.max_steps={steps}", "train.log_every=1", "train.eval_every=null",
                 "train.save_every=null", "data.eval=null", f"data.max_train_rows={steps * 32}",
                 f"train.report_to={report_to}", f"output_dir={out}"]
    in_trackers.clear()
    summary = train_from_config(str(EXAMPLE), overrides, on_step=lambda step: ticks.append(time.perf_counter()))
    return [b - a for a, b in zip(ticks, ticks[1:])][WARMUP:], summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("DELTATUNE_DATA", str(ROOT.parent / "shared" / "data"))
    if not Path(os.environ["DELTATUNE_DATA"]).is_dir():
        os.environ["DELTATUNE_DATA"] = str(Path("/work/shared/data"))

    from deltatune.tracking import base

    in_trackers: list[float] = []
    real_log = base.Trackers.log_metrics

    def timed_log(self, record, step):
        tick = time.perf_counter()
        real_log(self, record, step)
        if self.active:
            in_trackers.append(time.perf_counter() - tick)

    base.Trackers.log_metrics = timed_log
    from deltatune.tracking import mlflow_run

    sender_cpu: list[float] = []  # CPU seconds of each run's background sender thread
    real_send = mlflow_run.Sender._send

    def timed_send(self):
        start = time.thread_time()
        try:
            real_send(self)
        finally:
            sender_cpu.append(time.thread_time() - start)

    mlflow_run.Sender._send = timed_send
    steps: dict[str, list[float]] = {name: [] for name in VARIANTS}
    direct: list[float] = []
    sender_per_step: list[float] = []
    precision = None
    with tempfile.TemporaryDirectory(prefix="deltatune-tracking-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        for round_ in range(args.rounds + 1):
            for name, report_to in VARIANTS.items():
                times, summary = one_run(Path(tmp) / f"{name}-{round_}", args.steps, report_to, in_trackers)
                precision = "bf16 autocast" if summary["bf16"] else "fp32"
                if round_ == 0:
                    continue  # warm-up round
                steps[name] += times
                if name == "on":
                    direct += in_trackers[WARMUP + 1:]
                    sender_per_step.append(sender_cpu[-1] / args.steps)
                print(f"round {round_} {name}: median step {statistics.median(times) * 1000:.1f} ms "
                      f"over {len(times)} steps", flush=True)
    off, on = statistics.median(steps["off"]), statistics.median(steps["on"])
    result = {
        "machine": describe(), "cpu_flags": cpu_flags(), "precision": precision,
        "command": f"python benchmarks/training/tracking_cost.py --steps {args.steps} --rounds {args.rounds}",
        "example": "examples/sst2-minilm-lora.yaml", "log_every": 1, "steps_per_run": args.steps,
        "counted_rounds": args.rounds, "warmup_steps_per_run": WARMUP,
        "median_step_s": {"off": off, "on": on},
        "mean_step_s": {"off": statistics.fmean(steps["off"]), "on": statistics.fmean(steps["on"])},
        "ratio_on_off": on / off,
        "median_in_trackers_s": statistics.median(direct),
        "in_trackers_share_of_step": statistics.median(direct) / off,
        "sender_cpu_s_per_step": statistics.median(sender_per_step),
        "sender_cpu_share_of_step": statistics.median(sender_per_step) / off,
        "steps_s": steps,
    }
    print(f"CPU flags: {' '.join(cpu_flags())}; {precision}")
    print(f"median step: off {off * 1000:.1f} ms, on (MLflow, log_every 1) {on * 1000:.1f} ms, "
          f"ratio {on / off:.4f}; in the trackers: {statistics.median(direct) * 1000:.3f} ms per step "
          f"({100 * statistics.median(direct) / off:.2f}% of a step); background sender "
          f"{statistics.median(sender_per_step) * 1000:.2f} ms CPU per step "
          f"({100 * statistics.median(sender_per_step) / off:.2f}% of a step)")
    write_result(result, "training", "tracking-mlflow", args.out)


if __name__ == "__main__":
    main()
