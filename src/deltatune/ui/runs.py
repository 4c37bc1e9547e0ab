"""What the runs folder holds, read for the web page: runs (finished or still training) and
comparisons, each from the files the trainer and `compare` write — summary.json, metrics.jsonl,
config.yaml, results.json, report.md. Nothing here writes.

A run is identified by its output directory relative to the runs folder ("sst2/runs/lora"); while
it trains, its files are in the hidden `.NAME.partial/` beside it, and the same id finds them.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from deltatune.errors import DeltatuneError

MB = 1024 * 1024
PARTIAL_SUFFIX = ".partial"
# Inside a run directory these hold no other runs; not walked (a checkpoint has no summary.json).
# (wandb, mlartifacts: a tracker's copies, whose summary.json is not another run)
RUN_INTERNALS = {"checkpoints", "best", "tensorboard", "configs", "wandb", "mlartifacts", "mlruns"}
# A partial run whose metrics.jsonl changed this recently is taken to be training.
LIVE_SECONDS = 120


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # being written, or damaged: shown without it rather than failing the page


def _read_yaml(path: Path) -> dict:
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return values if isinstance(values, dict) else {}


def resolve(root: Path, run_id: str) -> Path:
    """The directory `run_id` names under `root`; never a path outside it."""
    root = Path(root).resolve()
    path = (root / run_id).resolve()
    if path != root and root not in path.parents:
        raise DeltatuneError(f"{run_id}: not inside the runs folder {root}")
    return path


def _id(root: Path, directory: Path) -> str:
    return directory.relative_to(root).as_posix() or "."


def run_files(final: Path) -> tuple[Path | None, str]:
    """(the directory holding the run's files, its state: finished | training | interrupted)."""
    partial = final.parent / f".{final.name}{PARTIAL_SUFFIX}"
    if partial.is_dir():  # a resumed run trains in partial while final is gone
        metrics = partial / "metrics.jsonl"
        newest = max((p.stat().st_mtime for p in (metrics, partial) if p.exists()), default=0)
        return partial, "training" if time.time() - newest < LIVE_SECONDS else "interrupted"
    if (final / "summary.json").is_file():
        return final, "finished"
    return None, "missing"


def method_label(method: dict | None) -> str:
    """"lora r=8" / "adapter b=24" / "prompt 20 tokens": the method and its main option."""
    method = method or {}
    name = str(method.get("name", "?"))
    if name == "lora" and "r" in method:
        return f"lora r={method['r']}"
    if name == "adapter" and method.get("bottleneck_size"):
        return f"adapter b={method['bottleneck_size']}"
    if name in ("prompt", "ptuning", "prefix") and method.get("num_virtual_tokens"):
        return f"{name} {method['num_virtual_tokens']} tokens"
    return name


def _score(summary: dict) -> tuple[str | None, float | None]:
    metric = summary.get("metric")
    value = (summary.get("final_eval") or {}).get(metric) if metric else None
    return metric, value if isinstance(value, (int, float)) else None


def run_row(root: Path, final: Path) -> dict[str, Any] | None:
    """One line of the runs table."""
    files, state = run_files(final)
    if files is None:
        return None
    config = _read_yaml(files / "config.yaml")
    summary = _read_json(files / "summary.json") or {} if state == "finished" else {}
    metric, score = _score(summary)
    method = summary.get("method") or config.get("method") or {}
    row = {"id": _id(root, final), "state": state,
           "method": method.get("name"), "method_label": method_label(method),
           "base": summary.get("model") or config.get("model"),
           "task": summary.get("task") or config.get("task"),
           "metric": metric, "score": score,
           "trainable_params": summary.get("trainable_params"),
           "trainable_percent": summary.get("trainable_percent"),
           "wall_time_s": summary.get("wall_time_s"),
           "peak_memory_mb": summary["peak_memory_bytes"] / MB if "peak_memory_bytes" in summary else None,
           "saved_mb": summary["saved_size_bytes"] / MB if "saved_size_bytes" in summary else None,
           "steps": summary.get("steps"), "updated": files.stat().st_mtime}
    if state != "finished":
        records = read_metrics(files)
        row["steps"] = max((r.get("step", 0) for r in records), default=0)
    return row


def is_comparison(directory: Path) -> bool:
    if (directory / "results.json").is_file():
        return True
    if (directory / "summary.json").exists() or (directory / "metrics.jsonl").exists():
        return False  # a run trained from a config that also has a compare: section
    return bool(_read_yaml(directory / "config.yaml").get("compare"))


def scan(root: Path) -> dict[str, list[dict]]:
    """Every run and comparison under `root`, newest first."""
    root = Path(root).resolve()
    runs, comparisons = [], []
    if not root.is_dir():
        return {"runs": [], "comparisons": []}
    for parent, dirs, files in os.walk(root):
        here = Path(parent)
        finals = set()
        for name in list(dirs):
            if name.startswith(".") and name.endswith(PARTIAL_SUFFIX):
                finals.add(name[1:-len(PARTIAL_SUFFIX)])
        comparison = is_comparison(here)
        if "summary.json" in files or comparison:
            dirs[:] = [d for d in dirs if d == "runs"]  # a comparison keeps its runs in runs/
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in RUN_INTERNALS]
        finals.update(d for d in dirs if (here / d / "summary.json").is_file())
        for name in sorted(finals):
            row = run_row(root, here / name)
            if row is not None:
                if here.name == "runs" and here != root and is_comparison(here.parent):
                    row["comparison"] = _id(root, here.parent)
                runs.append(row)
        if comparison:
            comparisons.append(comparison_row(root, here))
    runs.sort(key=lambda r: -r["updated"])
    comparisons.sort(key=lambda r: -r["updated"])
    return {"runs": runs, "comparisons": comparisons}


def read_metrics(files: Path, since: int = 0) -> list[dict]:
    """metrics.jsonl from line `since` on; a line still being written is left for next time."""
    path = files / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").split("\n")[since:]
    except OSError:
        return []
    records = []
    for line in lines[:-1] if lines else []:  # the last piece has no newline yet (or is "")
        try:
            records.append(json.loads(line))
        except ValueError:
            records.append({})  # keep line numbers aligned with the file
    return records


def tracking(directory: Path) -> dict[str, dict]:
    """The tracker runs of a run or comparison (its tracking.json), with a link to the MLflow
    run's page; {} when it reported to no tracker that keeps runs."""
    from deltatune.tracking.base import read_ids
    from deltatune.tracking.mlflow_run import run_link

    ids = read_ids(directory)
    found = {}
    if isinstance(ids.get("mlflow"), dict) and {"run_id", "experiment_id"} <= ids["mlflow"].keys():
        found["mlflow"] = {**ids["mlflow"], "url": run_link(ids["mlflow"])}
    if isinstance(ids.get("wandb"), dict):
        found["wandb"] = ids["wandb"]
    return found


def checkpoints(files: Path) -> list[dict]:
    found = []
    for path in sorted((files / "checkpoints").glob("step-*")):
        try:
            step = int(path.name.split("-", 1)[1])
        except ValueError:
            continue
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        found.append({"name": path.name, "step": step, "size_mb": size / MB})
    found.sort(key=lambda c: c["step"])
    if (files / "best").is_dir():
        found.append({"name": "best", "step": None,
                      "size_mb": sum(p.stat().st_size for p in (files / "best").rglob("*") if p.is_file()) / MB})
    return found


def run_detail(root: Path, run_id: str, since: int = 0) -> dict[str, Any]:
    """A run's page: config, summary, metrics from line `since`, checkpoints."""
    final = resolve(root, run_id)
    files, state = run_files(final)
    if files is None:
        raise DeltatuneError(f"{run_id}: no run here (no summary.json, no training in progress)")
    records = read_metrics(files, since)
    try:
        config_text = (files / "config.yaml").read_text(encoding="utf-8")
    except OSError:
        config_text = ""
    return {"id": run_id, "state": state, "row": run_row(Path(root).resolve(), final),
            "config": config_text, "summary": _read_json(files / "summary.json") if state == "finished" else None,
            "metrics": records, "next": since + len(records), "checkpoints": checkpoints(files),
            "tracking": tracking(files)}


def comparison_row(root: Path, directory: Path) -> dict[str, Any]:
    config = _read_yaml(directory / "config.yaml")
    rows = _read_json(directory / "results.json")
    settings = config.get("compare") or {}
    return {"id": _id(root, directory), "base": config.get("model"),
            "task": config.get("task"), "methods": settings.get("methods") or [],
            "state": "finished" if isinstance(rows, list) else "running",
            "updated": directory.stat().st_mtime}


def _report_reading(directory: Path) -> str | None:
    try:
        text = (directory / "report.md").read_text(encoding="utf-8")
    except OSError:
        return None
    _, found, rest = text.partition("## Reading")
    return rest.split("\n![", 1)[0].strip() if found else None


def comparison_detail(root: Path, comparison_id: str) -> dict[str, Any]:
    """A comparison's table and reading: results.json once written; before that, the rows of
    the methods whose runs have finished (so the chart fills in as they do)."""
    from deltatune.compare.report import build_rows, reading
    from deltatune.compare.settings import ALL_METHODS

    root = Path(root).resolve()
    directory = resolve(root, comparison_id)
    if not is_comparison(directory):
        raise DeltatuneError(f"{comparison_id}: not a comparison (no results.json, no compare: config)")
    head = comparison_row(root, directory)
    config = _read_yaml(directory / "config.yaml")
    rows = _read_json(directory / "results.json")
    methods = head["methods"] or ALL_METHODS
    progress = {}
    for name in methods:
        _, state = run_files(directory / "runs" / name)
        progress[name] = state if state != "missing" else "waiting"
    if isinstance(rows, list):
        text = _report_reading(directory) or reading(rows, config.get("task", ""))
    else:
        finished = {n: _read_json(directory / "runs" / n / "summary.json") for n in methods
                    if progress[n] == "finished"}
        base = _read_json(directory / "base" / "score.json")  # generation's no-skill level, once scored
        if isinstance(base, dict) and "score" in base:
            from deltatune.compare.base_score import judge

            finished = {n: judge(s, base) if s else s for n, s in finished.items()}
        rows = build_rows(None, {n: s for n, s in finished.items() if s}, {}, None)
        text = reading(rows, config.get("task", "")) if rows else ""
    for row in rows:
        row["run"] = f"{head['id']}/runs/{row['method']}"
    return {**head, "rows": rows, "reading": text, "progress": progress,
            "data": (config.get("data") or {}).get("train"), "tracking": tracking(directory)}
