"""Per-method learning-rate search on a held-out slice of the TRAINING file (never the eval file).

    compare:
      search:
        lr: auto             # or [1.0e-4, 3.0e-4], or per method {prefix: [3.0e-3, 1.0e-2], lora: auto}
        points: 3            # auto: this many lrs, log-spaced around the method's default_lr ...
        factor: 3.0          # ... each `factor` times the previous one
        rows: 400            # training rows the candidates fit on
        heldout_rows: 200    # training rows they are scored on (never the same rows)
        steps: 30            # optimizer steps per candidate (none: the run's epochs over `rows`)

The first `rows + heldout_rows` of the rows the final runs train on are shuffled (fixed seed) and
split in two files under OUT/search/. Each candidate trains on one and is scored on the other by
the run's metric; the best lr per method is the final runs' lr. A candidate that diverged — the
loss became NaN/inf, or the training loss at the end is over 10% above the loss at the start — is recorded as
diverged and never chosen; if every candidate of a method diverged, the method fails in the
table with that reason instead of training at a bad lr.
"""
from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path
from typing import Any

from deltatune.config.run import RunConfig
from deltatune.errors import DeltatuneError

KEYS = {"lr", "points", "factor", "rows", "heldout_rows", "steps"}
LOWER_IS_BETTER = {"perplexity"}
RISE = 1.1  # the last logged loss above 1.1x the first: diverged


def read_search(value: Any, methods: list[str]) -> dict | None:
    """The validated `compare.search` settings, or None (no search: each method's own lr)."""
    if value in (None, False):
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise DeltatuneError(f"compare.search: expected a mapping (e.g. {{lr: auto}}), got {value!r}")
    for key in value:
        if key not in KEYS:
            raise DeltatuneError(f"compare.search.{key}: unknown key (known: {', '.join(sorted(KEYS))})")
    search = {"points": 3, "factor": 3.0, "rows": 400, "heldout_rows": 200, "steps": None, **value}
    for key in ("points", "rows", "heldout_rows", "steps"):
        if search[key] is not None and (not isinstance(search[key], int) or search[key] < 1):
            raise DeltatuneError(f"compare.search.{key}: must be a positive integer, got {search[key]!r}")
    if not isinstance(search["factor"], (int, float)) or search["factor"] <= 1:
        raise DeltatuneError(f"compare.search.factor: must be a number > 1, got {search['factor']!r}")
    lrs = search.pop("lr", "auto")
    per_method = lrs if isinstance(lrs, dict) else {name: lrs for name in methods}
    for name, spec in per_method.items():
        where = f"compare.search.lr.{name}" if isinstance(lrs, dict) else "compare.search.lr"
        if spec == "auto":
            continue
        if (not isinstance(spec, list) or not spec
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in spec)):
            raise DeltatuneError(f"{where}: expected auto or a list of positive numbers, got {spec!r}")
    search["lrs"] = per_method
    return search


def candidate_lrs(search: dict, method: str, default_lr: float) -> list[float]:
    spec = search["lrs"].get(method, "auto")
    if spec != "auto":
        return [float(x) for x in spec]
    points, factor = search["points"], float(search["factor"])
    first = -(points - 1) / 2  # centred on the default: 3 points -> default/f, default, default*f
    return [float(f"{default_lr * factor ** (first + i):.3g}") for i in range(points)]


def _write_if_changed(path: Path, text: str) -> None:
    """Rewritten only when the rows change, so a rerun's candidates stay reusable (their key
    includes the files' modification time)."""
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def split_training(config: RunConfig, search: dict, out_dir: Path) -> tuple[Path, Path]:
    """(fit file, held-out file): two disjoint slices of the training file. The eval file is
    never opened here."""
    from deltatune.data.files import read_rows

    wanted = search["rows"] + search["heldout_rows"]
    pool = config.data.max_train_rows
    rows = read_rows(config.data.train, "train", text_field=config.data.text_field,
                     limit=min(pool, wanted) if pool else wanted)
    if len(rows) < wanted:
        raise DeltatuneError(f"compare.search: rows + heldout_rows = {wanted}, but {config.data.train} gives "
                             f"only {len(rows)} training rows; lower them")
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    heldout = [rows[i].values for i in order[:search["heldout_rows"]]]
    fit = [rows[i].values for i in order[search["heldout_rows"]:]]
    directory = out_dir / "search"
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "fit.jsonl", directory / "heldout.jsonl"
    for path, part in zip(paths, (fit, heldout)):
        _write_if_changed(path, "".join(json.dumps(r, default=str) + "\n" for r in part))
    return paths


def candidate_values(values: dict, lr: float, fit: Path, heldout: Path, search: dict,
                     run_dir: Path) -> dict:
    """A final run's config turned into a search candidate: other data, own lr, short budget."""
    candidate = copy.deepcopy(values)
    candidate["data"].update(train=str(fit.resolve()), eval=str(heldout.resolve()),
                             max_train_rows=None, max_eval_rows=None)
    train = candidate["train"]
    train.update(lr=lr, on_nan="stop", eval_every=None, save_every=None, early_stopping_patience=None)
    if search["steps"]:
        train["max_steps"] = search["steps"]
    train["log_every"] = 1  # every step's loss: the first (before any update) is the start
    candidate["output_dir"] = str(run_dir)
    return candidate


def judge(summary: dict) -> dict:
    """{"score": ..., "status": "ok"} or {"status": "diverged" | "failed", "why": ...}."""
    if "error" in summary:
        error = summary["error"]
        if "the loss is" in error:  # the trainer's one line for a NaN/inf loss (on_nan: stop)
            return {"status": "diverged", "why": error}
        return {"status": "failed", "why": error}
    metric = summary.get("metric")
    final = summary.get("final_eval") or {}
    score = final.get(metric)
    if score is None or not math.isfinite(score) or not math.isfinite(final.get("loss", 0.0)):
        return {"status": "diverged", "why": f"held-out {metric} {score}, loss {final.get('loss')}"}
    from deltatune.training.progress import read_metrics

    losses = [r["loss"] for r in read_metrics(Path(summary["output_dir"])) if "loss" in r]
    if any(not isinstance(x, (int, float)) or not math.isfinite(x) for x in losses):
        return {"status": "diverged", "why": "a logged training loss was not finite"}
    # The start is step 1's loss (computed before any update); the end, the mean of the last fifth
    # of the steps (one batch is noisy). "Above its start" with a margin: a run that learns
    # nothing wanders by a few percent either way, and divergence is not that.
    if len(losses) >= 2:
        tail = losses[-max(1, len(losses) // 5):]
        end = sum(tail) / len(tail)
        if end > RISE * losses[0]:
            return {"status": "diverged", "why": f"training loss rose from {losses[0]:.4f} to {end:.4f}",
                    "score": score}
    return {"status": "ok", "score": score, "metric": metric}


def choose(candidates: list[dict]) -> dict | None:
    """The best non-diverged candidate ({"lr", "score", "metric", ...}), or None."""
    ok = [c for c in candidates if c["status"] == "ok"]
    if not ok:
        return None
    sign = -1 if ok[0]["metric"] in LOWER_IS_BETTER else 1
    # ties go to the smaller lr: the safer of two equally good settings
    return max(ok, key=lambda c: (sign * c["score"], -c["lr"]))
