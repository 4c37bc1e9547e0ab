"""Per-method hyperparameter search on a held-out slice of the TRAINING file (never the eval file).

    compare:
      search:
        trials: 8            # per method, the same for every method
        space: {lr: auto}    # for every method that has the parameter (compare/space.py)
        per_method: {lora: {r: [4, 8, 16]}, prompt: {num_virtual_tokens: [10, 20, 50]}}
        steps: 30            # optimizer steps per trial (none: the run's epochs over `rows`)
        rows: 400            # training rows a trial fits on (default: scaled down to a small file)
        heldout_rows: 200    # other training rows it is scored on
        pruner: median       # or hyperband | none: stop a trial whose held-out score lags
        storage: null        # default OUT/study.db (SQLite); any SQLAlchemy URL

An Optuna study per method (compare/study.py) samples its trials (TPE, seeded by train.seed).
The older form `lr: [1e-4, 3e-4]` (or `lr: auto` with `points`/`factor`) still works: a grid of
those lrs, every point one trial. The first `rows + heldout_rows` of the rows the final runs
train on are shuffled (fixed seed) and split in two files under OUT/search/. Each trial trains on
one and is scored on the other by the run's metric, the held-out loss breaking ties. A trial
that diverged — the loss became NaN/inf, or the training loss at the end is over 10% above the
loss at the start — is recorded as failed and never chosen; if every trial of a method failed,
the method fails in the table with that reason instead of training at a bad setting. When no
trial of a method learned anything, or all scored the same, the search cannot tell its trials
apart: the final run uses the method's defaults and the report says so.
"""
from __future__ import annotations

import copy
import json
import os
import math
import random
from pathlib import Path
from typing import Any

from deltatune.config.run import RunConfig
from deltatune.errors import DeltatuneError

KEYS = {"trials", "space", "per_method", "steps", "rows", "heldout_rows", "pruner", "storage",
        "lr", "points", "factor"}  # lr/points/factor: the lr grid of earlier configs
PRUNERS = ("median", "hyperband", "none")
DEFAULTS = {"trials": 8, "rows": 400, "heldout_rows": 200, "steps": None, "pruner": "median",
            "storage": None, "points": 3, "factor": 3.0}
LOWER_IS_BETTER = {"perplexity"}
RISE = 1.1  # the last logged loss above 1.1x the first: diverged
EVALUATIONS = 4  # held-out evaluations per trial: what the pruner sees
MIN_HELDOUT = 16  # a held-out slice smaller than this cannot rank anything


def _positive_int(value: Any, key: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise DeltatuneError(f"compare.search.{key}: must be a positive integer, got {value!r}")


def check_storage(url: Any) -> str | None:
    """A storage URL SQLAlchemy can parse (or None: OUT/study.db)."""
    if url is None:
        return None
    if not isinstance(url, str) or "://" not in url:
        raise DeltatuneError(f"compare.search.storage: expected an SQLAlchemy URL such as "
                             f"sqlite:///study.db or postgresql://user@host/db, got {url!r}")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except ArgumentError as exc:
        raise DeltatuneError(f"compare.search.storage: {url!r} is not a database URL ({exc})") from None
    return url


def read_search(value: Any, methods: list[str], method_options: dict[str, dict] | None = None) -> dict | None:
    """The validated `compare.search` settings, or None (no search: each method's own settings).
    `method_options`: each row's `method:` mapping (its spaces are checked against it)."""
    from deltatune.compare.space import resolve_space

    if value in (None, False):
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise DeltatuneError(f"compare.search: expected a mapping (e.g. {{trials: 8}}), got {value!r}")
    for key in value:
        if key not in KEYS:
            raise DeltatuneError(f"compare.search.{key}: unknown key (known: {', '.join(sorted(KEYS))})")
    if "lr" in value and ("space" in value or "per_method" in value):
        raise DeltatuneError("compare.search.lr: the lr grid of earlier configs cannot be mixed with "
                             "space/per_method; write space: {lr: [...]} instead")
    search = {**DEFAULTS, **value}
    if "lr" in value and "pruner" not in value:
        search["pruner"] = "none"  # the lr grid of earlier configs ran every point to the end
    search["rows_given"] = "rows" in value or "heldout_rows" in value
    for key in ("trials", "points", "rows", "heldout_rows", "steps"):
        _positive_int(search[key], key)
    if not isinstance(search["factor"], (int, float)) or search["factor"] <= 1:
        raise DeltatuneError(f"compare.search.factor: must be a number > 1, got {search['factor']!r}")
    if search["pruner"] is None or search["pruner"] is False:
        search["pruner"] = "none"
    if search["pruner"] not in PRUNERS:
        raise DeltatuneError(f"compare.search.pruner: one of {', '.join(PRUNERS)}, got {search['pruner']!r}")
    search["storage"] = check_storage(search["storage"])
    options = method_options or {}
    spaces, grids = {}, {}
    if "lr" in value:  # the lr grid of earlier configs
        lrs = value["lr"]
        per_row = lrs if isinstance(lrs, dict) else {name: lrs for name in methods}
        for name, spec in per_row.items():
            where = f"compare.search.lr.{name}" if isinstance(lrs, dict) else "compare.search.lr"
            if spec == "auto":
                continue
            if (not isinstance(spec, list) or not spec
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in spec)):
                raise DeltatuneError(f"{where}: expected auto or a list of positive numbers, got {spec!r}")
        for name in methods:
            spec = per_row.get(name, "auto")
            if spec == "auto" and not ("points" in value or "factor" in value):
                spaces[name] = resolve_space(_options(options, name), {"lr": "auto"}, {}, "compare.search.lr")
                spaces[name] = {"lr": spaces[name]["lr"]}  # the lr alone, as this form always meant
            else:
                grids[name] = [{"lr": lr} for lr in candidate_lrs(search, name, _default_lr(options, name), spec)]
    else:
        shared = value.get("space") or {}
        per_method = value.get("per_method") or {}
        if not isinstance(shared, dict):
            raise DeltatuneError(f"compare.search.space: expected a mapping such as {{lr: auto}}, got {shared!r}")
        if not isinstance(per_method, dict):
            raise DeltatuneError(f"compare.search.per_method: expected a mapping of method to space, got {per_method!r}")
        for name, own in per_method.items():
            if name not in methods:
                raise DeltatuneError(f"compare.search.per_method.{name}: not in compare.methods "
                                     f"({', '.join(methods)})")
            if not isinstance(own, dict):
                raise DeltatuneError(f"compare.search.per_method.{name}: expected a mapping, got {own!r}")
        from deltatune.compare.space import searchable

        for key in shared:  # a row is METHOD or METHOD@QUANTIZE (settings.split_row)
            if not any(key in searchable(name.partition("@")[0]) for name in methods):
                raise DeltatuneError(f"compare.search.space.{key}: no method in this comparison has a "
                                     f"parameter {key!r}")
        for name in methods:
            spaces[name] = resolve_space(_options(options, name), shared, per_method.get(name) or {},
                                         f"compare.search.per_method.{name}")
    search["spaces"], search["grids"] = spaces, grids
    return search


def _options(options: dict[str, dict], row: str) -> dict:
    return options.get(row) or {"name": row.partition("@")[0]}


def _default_lr(options: dict[str, dict], row: str) -> float:
    from deltatune.methods import config_from_dict, default_lr_for

    return default_lr_for(config_from_dict(_options(options, row)))


def trials_for(search: dict, row: str) -> int:
    """How many trials a row's study runs: its grid's points, else compare.search.trials."""
    return len(search["grids"][row]) if row in search["grids"] else search["trials"]


def candidate_lrs(search: dict, method: str, default_lr: float, spec: Any = "auto") -> list[float]:
    if spec != "auto":
        return [float(x) for x in spec]
    points, factor = search["points"], float(search["factor"])
    first = -(points - 1) / 2  # centred on the default: 3 points -> default/f, default, default*f
    return [float(f"{default_lr * factor ** (first + i):.3g}") for i in range(points)]


def _write_if_changed(path: Path, text: str) -> None:
    """Rewritten only when the rows change: a --join worker writes the same rows beside the
    coordinator (the study's key holds the files' content fingerprints, not their times)."""
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # a --join worker may write it too
    tmp.write_text(text)
    tmp.replace(path)


def search_rows(search: dict, available: int, where: str) -> tuple[int, int]:
    """(fit rows, held-out rows). Defaults shrink to a small training file, keeping a third of it
    (at least MIN_HELDOUT rows) to score on; rows given in the config are taken as given."""
    rows, heldout = search["rows"], search["heldout_rows"]
    if rows + heldout <= available:
        return rows, heldout
    if search["rows_given"]:
        raise DeltatuneError(f"compare.search: rows + heldout_rows = {rows + heldout}, but {where} gives "
                             f"only {available} training rows; lower them")
    heldout = max(MIN_HELDOUT, min(heldout, available // 3))
    if available - heldout < MIN_HELDOUT:
        raise DeltatuneError(f"compare.search: {where} gives only {available} training rows, too few to "
                             f"fit on some and score on {MIN_HELDOUT} others; give more rows or drop search")
    return min(rows, available - heldout), heldout


def split_training(config: RunConfig, search: dict, out_dir: Path) -> tuple[Path, Path]:
    """(fit file, held-out file): two disjoint slices of the training file. The eval file is
    never opened here. Sets search["rows"]/["heldout_rows"] to what was used."""
    from deltatune.data.files import read_rows

    wanted = search["rows"] + search["heldout_rows"]
    pool = config.data.max_train_rows
    rows = read_rows(config.data.train, "train", text_field=config.data.text_field,
                     limit=min(pool, wanted) if pool else wanted)
    search["rows"], search["heldout_rows"] = search_rows(search, len(rows), str(config.data.train))
    rows = rows[:search["rows"] + search["heldout_rows"]]
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


def trial_values(values: dict, params: dict, fit: Path, heldout: Path, search: dict, run_dir: Path) -> dict:
    """A final run's config turned into a search trial: other data, the trial's parameters, a
    short budget, and held-out evaluations along the way for the pruner."""
    from deltatune.compare.jobs import expected_steps
    from deltatune.compare.space import apply_params

    candidate = apply_params(copy.deepcopy(values), params)
    candidate["data"].update(train=str(fit.resolve()), eval=str(heldout.resolve()),
                             max_train_rows=None, max_eval_rows=None)
    train = candidate["train"]
    train.update(on_nan="stop", eval_every=None, save_every=None, early_stopping_patience=None)
    if search["steps"]:
        train["max_steps"] = search["steps"]
    steps = expected_steps(candidate, search["rows"])
    if search["pruner"] != "none" and steps >= 2 * EVALUATIONS:
        train["eval_every"] = steps // EVALUATIONS
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
    return {"status": "ok", "score": score, "metric": metric, "loss": final.get("loss"),
            "learned": summary.get("learned"),
            "why_not_learned": (summary.get("did_not_learn") or {}).get("reason")}


def _sign(metric: str) -> int:
    return -1 if metric in LOWER_IS_BETTER else 1


def choose(candidates: list[dict]) -> dict | None:
    """The best trial that did not fail ({"params", "score", "loss", "metric", ...}), or None.
    The held-out loss breaks ties of the metric (accuracy ties easily on a small slice)."""
    ok = [c for c in candidates if c["status"] == "ok"]
    if not ok:
        return None
    sign = _sign(ok[0]["metric"])
    return max(ok, key=lambda c: (sign * c["score"], -(c.get("loss") if c.get("loss") is not None
                                                      else math.inf), -c.get("number", 0)))


def indistinct(candidates: list[dict], heldout_rows: int) -> str | None:
    """Why a method's trials cannot be told apart, or None. Then no trial is better than another,
    and choosing one would be choosing blindly."""
    ok = [c for c in candidates if c["status"] == "ok"]
    if not ok:
        return None
    if all(c.get("learned") is False for c in ok):
        return (f"no trial learned anything (every one at the no-information level: "
                f"{ok[0].get('why_not_learned') or 'majority class'})")
    if len(ok) < 2:
        return None
    scores = [c["score"] for c in ok]
    losses = [c["loss"] for c in ok if c.get("loss") is not None]
    same_score = max(scores) - min(scores) < (1.0 / heldout_rows if ok[0]["metric"] != "perplexity"
                                              else 1e-3 * min(scores))
    same_loss = not losses or max(losses) - min(losses) < 0.01 * max(abs(min(losses)), 1e-9)
    if same_score and same_loss:
        return (f"every trial scored the same on {heldout_rows} held-out rows "
                f"({ok[0]['metric']} {scores[0]:.4f}, loss within 1%)")
    return None
