"""The Optuna search against the 3-point lr grid at the same search budget, and one worker against two.

    python benchmarks/quality/search_vs_grid.py grid   [--config C] [--methods a,b] [--trials 3]
    python benchmarks/quality/search_vs_grid.py workers [--config C] [--method lora] [--trials 4]

grid: on the MiniLM reference config (examples/compare-minilm-tuned.yaml: 10 steps of 32 rows on
320 training rows, scored on 160 others), each method's search runs twice — the config's 3-point
lr grid, and an Optuna study (TPE over the method's own space) with as many trials of the same
steps and rows, no pruning: the same tokens. The result is each method's best held-out score
(and loss) in each arm. Only the search runs, not the final runs.

workers: one method's study (`--trials` trials, pruning off) run by one worker, then by two
worker processes on the same SQLite study (the second with --join), wall time of each; the
CPU threads are split between the two (OMP_NUM_THREADS = cores / 2 each).

Run it under the heavy-job lock, e.g.
    flock /tmp/deltatune-heavy.lock python benchmarks/quality/search_vs_grid.py grid
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

from common.machine import cpu_flags, describe, write_result  # noqa: E402

REFERENCE = ROOT / "examples" / "compare-minilm-tuned.yaml"


def search_only(config_path: Path, overrides: list[str], out_dir: Path) -> dict:
    """Run the config's search stage alone; {method: {"best": score, "loss": .., "trials": ..}}."""
    from deltatune.compare import study as studies
    from deltatune.compare.fair import _search_queues, collect
    from deltatune.compare.runner import method_run_config, run_method
    from deltatune.compare.settings import read_compare_config
    from deltatune.training.evaluation import default_metric

    config, settings = read_compare_config(str(config_path), overrides + [f"output_dir={out_dir}"])
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = studies.open_storage(studies.storage_url(settings["search"], out_dir))
    tick = time.time()
    names, work = _search_queues(config, settings, out_dir, False, True, storage, run_method, method_run_config)
    studies.in_threads(settings["workers"], work)
    seconds = time.time() - tick
    metric = config.train.metric or default_metric(config.task)
    found = collect(storage, dict(zip(settings["methods"], names)), settings["search"], metric)
    result = {}
    for name, entry in found.items():
        best = entry["best"]
        result[name] = {"best": best and best["score"], "loss": best and best.get("loss"),
                        "params": best and best["params"], "indistinct": entry["indistinct"],
                        "trials": [{k: c.get(k) for k in ("number", "params", "status", "score", "loss")}
                                   for c in entry["candidates"]]}
    return {"methods": result, "seconds": seconds}


def grid_vs_search(args: argparse.Namespace) -> None:
    config = Path(args.config)
    values = yaml.safe_load(config.read_text())
    search = values["compare"]["search"]
    methods = args.methods or ",".join(values["compare"]["methods"])
    common = [f"compare.methods=[{methods}]", "compare.workers=1"]
    out = ROOT / "runs" / "bench-search-vs-grid"
    grid = search_only(config, common, out / "grid")
    optuna_search = {"trials": args.trials, "steps": search["steps"], "rows": search["rows"],
                     "heldout_rows": search["heldout_rows"], "pruner": "none"}
    spec = "{" + ", ".join(f"{k}: {v}" for k, v in optuna_search.items()) + "}"
    tpe = search_only(config, common + [f"compare.search={spec}"], out / "optuna")
    rows = []
    for name in grid["methods"]:
        g, o = grid["methods"][name], tpe["methods"][name]
        diff = None if g["best"] is None or o["best"] is None else o["best"] - g["best"]
        rows.append({"method": name, "grid_best": g["best"], "grid_loss": g["loss"], "grid_params": g["params"],
                     "optuna_best": o["best"], "optuna_loss": o["loss"], "optuna_params": o["params"],
                     "difference": diff, "grid_trials": g["trials"], "optuna_trials": o["trials"]})
        print(f"{name:10s} grid {g['best']}  optuna {o['best']}  diff {diff}", flush=True)
    write_result({"name": "search-vs-grid", "machine": describe(), "cpu_flags": cpu_flags(),
                  "precision": "bf16 autocast where the CPU has it (train.bf16: auto)",
                  "command": "python benchmarks/quality/search_vs_grid.py grid " + " ".join(sys.argv[2:]),
                  "config": str(config.relative_to(ROOT)), "budget": {**optuna_search, "trials_per_method": args.trials},
                  "seconds": {"grid": grid["seconds"], "optuna": tpe["seconds"]}, "rows": rows},
                 "quality", "search-vs-grid")


def workers(args: argparse.Namespace) -> None:
    config = Path(args.config)
    cores = os.cpu_count() or 2
    spec = f"{{trials: {args.trials}, steps: 10, rows: 320, heldout_rows: 160, pruner: none}}"
    times = {}
    for count in (1, 2):
        out = ROOT / "runs" / f"bench-workers-{count}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        overrides = [f"compare.methods=[{args.method}]", "compare.workers=1", f"compare.search={spec}",
                     f"output_dir={out}", "compare.seeds=[0]"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // count)), "PYTHONPATH": str(ROOT / "src")}
        command = [sys.executable, "-m", "deltatune.cli", "compare", str(config), *overrides]
        tick = time.time()
        processes = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)]
        if count == 2:
            time.sleep(2)
            processes.append(subprocess.Popen(command + ["--join"], env=env, stdout=subprocess.DEVNULL))
        codes = [p.wait() for p in processes]
        times[count] = time.time() - tick
        if any(codes):
            raise SystemExit(f"{count} worker(s): exit codes {codes}; nothing written")
        print(f"{count} worker(s): {times[count]:.0f} s (exit {codes})", flush=True)
    write_result({"name": "study-workers", "machine": describe(), "cpu_flags": cpu_flags(),
                  "command": "python benchmarks/quality/search_vs_grid.py workers " + " ".join(sys.argv[2:]),
                  "config": str(config.relative_to(ROOT)), "method": args.method, "trials": args.trials,
                  "seconds": {str(k): v for k, v in times.items()}, "ratio": times[2] / times[1]},
                 "quality", "study-workers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("grid", "workers"))
    parser.add_argument("--config", default=str(REFERENCE))
    parser.add_argument("--methods", default=None)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    grid_vs_search(args) if args.what == "grid" else workers(args)


if __name__ == "__main__":
    main()
