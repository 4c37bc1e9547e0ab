"""Seeds and data sizes: one method's rows over seeds -> mean ± std; learning curves over sizes.

    compare:
      seeds: [0, 1, 2]              # final runs repeated per seed (default: train.seed alone)
      data_sizes: [250, 1000, 4000] # extra final runs on the first N training rows: curves.png
      curve_seeds: [0]              # seeds of those extra runs (default: every seed above)
      workers: 2                    # runs at once, the CPU threads divided between them

Two methods are "level" when their difference in mean score is within noise: less than twice
the standard error of the difference (sqrt(sa²/na + sb²/nb)), i.e. about a 95% interval. With
one seed there is no spread to measure, and only an exact tie (under 0.05 points) is level.
"""
from __future__ import annotations

import io
import math
import statistics
from pathlib import Path
from typing import Any

from deltatune.errors import DeltatuneError

SPREAD = ("score", "forgetting", "perplexity", "time_per_step_s", "peak_memory_mb", "wall_time_s")


def _int_list(value: Any, key: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
        raise DeltatuneError(f"compare.{key}: expected a list of integers, got {value!r}")
    if len(set(value)) != len(value):
        raise DeltatuneError(f"compare.{key}: has duplicates: {value!r}")
    return value


def read_repeats(settings: dict, seed: int, max_train_rows: int | None) -> dict:
    seeds = _int_list(settings.get("seeds", [seed]), "seeds")
    sizes = _int_list(settings["data_sizes"], "data_sizes") if settings.get("data_sizes") else []
    for size in sizes:
        if size < 1 or (max_train_rows and size > max_train_rows):
            raise DeltatuneError(f"compare.data_sizes: {size} must be between 1 and data.max_train_rows "
                                 f"({max_train_rows})" if max_train_rows else f"compare.data_sizes: {size} must be >= 1")
    curve_seeds = _int_list(settings["curve_seeds"], "curve_seeds") if "curve_seeds" in settings else seeds
    if not set(curve_seeds) <= set(seeds):
        raise DeltatuneError(f"compare.curve_seeds: {curve_seeds!r} must be some of compare.seeds {seeds!r}")
    if "curve_seeds" in settings and not sizes:
        raise DeltatuneError("compare.curve_seeds: set compare.data_sizes too; without it there is no curve")
    workers = settings.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise DeltatuneError(f"compare.workers: must be a positive integer, got {workers!r}")
    return {"seeds": seeds, "data_sizes": sorted(sizes), "curve_seeds": curve_seeds, "workers": workers}


def run_sizes(settings: dict, max_train_rows: int | None) -> list[int | None]:
    """The final runs' data sizes: None (the run's own training budget), then each smaller size."""
    return [None] + [s for s in settings["data_sizes"] if s != max_train_rows]


def seeds_at(settings: dict, size: int | None) -> list[int]:
    """The seeds a final run is repeated over: every seed at the full budget (size None), the
    curve's seeds at a smaller data size (a cheaper curve; the full-size point keeps its spread)."""
    return settings["seeds"] if size is None else settings.get("curve_seeds", settings["seeds"])


def aggregate(rows_per_seed: list[list[dict]]) -> list[dict]:
    """One row per method: numbers averaged over the seeds that finished, spread as KEY_std."""
    merged = []
    for position, first in enumerate(rows_per_seed[0]):
        name = first["method"]
        rows = [seed_rows[position] for seed_rows in rows_per_seed]
        ok = [r for r in rows if "error" not in r]
        if not ok:
            merged.append(dict(rows[0]))
            continue
        row = dict(ok[0])
        row["seeds"] = len(ok)
        if len(ok) < len(rows):
            row["failed_seeds"] = [r["error"] for r in rows if "error" in r]
        for key, value in ok[0].items():
            values = [r.get(key) for r in ok]
            if (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and all(isinstance(v, (int, float)) for v in values)):
                row[key] = values[0] if len(set(values)) == 1 else statistics.fmean(values)
                if key in SPREAD:
                    row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        row["scores"] = [r.get("score") for r in ok]
        misses = sum(r.get("learned") is False for r in ok)  # seeds that did not learn
        if any(r.get("learned") is not None for r in ok):
            row["learned"] = misses < len(ok)
        if 0 < misses < len(ok):
            row["not_learned_seeds"] = misses
        assert row["method"] == name
        merged.append(row)
    return merged


def noise(a: dict, b: dict, key: str = "score") -> float | None:
    """Twice the standard error of the difference of two means; None without a spread."""
    sa, sb = a.get(f"{key}_std"), b.get(f"{key}_std")
    if sa is None or sb is None:
        return None
    return 2 * math.sqrt(sa ** 2 / a.get("seeds", 1) + sb ** 2 / b.get("seeds", 1))


def level(a: dict, b: dict, key: str = "score") -> bool:
    threshold = noise(a, b, key)
    return abs(a[key] - b[key]) <= (threshold if threshold is not None else 0.0005)


def spread(row: dict, key: str, scale: float = 1.0, digits: int = 1) -> str:
    std = row.get(f"{key}_std")
    return "" if std is None else f" ± {scale * std:.{digits}f}"


def curve_table(curves: dict[int, list[dict]], task: str) -> str:
    """Markdown: score (and forgetting) per method per training size."""
    sizes = sorted(curves)
    methods = [r["method"] for r in curves[sizes[0]]]
    lines = ["| method | " + " | ".join(f"{s:,} rows" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for i, name in enumerate(methods):
        cells = []
        for size in sizes:
            row = curves[size][i]
            if "error" in row or row.get("score") is None:
                cells.append("failed")
                continue
            cell = f"{100 * row['score']:.1f}%{spread(row, 'score', 100)}"
            if task == "causal-lm" and row.get("forgetting") is not None:
                cell += f" (Δppl {row['forgetting']:+.2f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(curves: dict[int, list[dict]], path: Path, title: str, task: str, write) -> None:
    """curves.png: score against training rows per method, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sizes = sorted(curves)
    forgetting = task == "causal-lm" and any(r.get("forgetting") is not None for rs in curves.values() for r in rs)
    fig, axes = plt.subplots(1, 2 if forgetting else 1, figsize=(11 if forgetting else 7, 4.5), squeeze=False)
    panels = [("score", 100.0, "score (%)")] + ([("forgetting", 1.0, "forgetting Δppl (tuned − base)")]
                                                 if forgetting else [])
    for ax, (key, scale, label) in zip(axes[0], panels):
        for i, first in enumerate(curves[sizes[0]]):
            points = [(s, curves[s][i]) for s in sizes if curves[s][i].get(key) is not None]
            if not points:
                continue
            ax.errorbar([s for s, _ in points], [scale * r[key] for _, r in points],
                        yerr=[scale * (r.get(f"{key}_std") or 0.0) for _, r in points],
                        marker="o", capsize=3, label=first["method"])
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{s:,}" for s in sizes])  # label the measured sizes, not powers of ten
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("training rows (log scale)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title + "\n(error bars: std over seeds)", fontsize=10)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write(path, buffer.getvalue())
