"""The comparison's outputs: one row per method, as a table, JSON, CSV, a plot and a reading."""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from deltatune.compare.repeats import level
from deltatune.config.run import RunConfig

MB = 1024 * 1024
COLUMNS = [  # (key, header, format)
    ("method", "method", "{}"),
    ("score", "score", "{:.2%}"),
    ("trainable_params", "trainable", "{:,}"),
    ("trainable_percent", "share %", "{:.3f}"),
    ("wall_time_s", "wall s", "{:.0f}"),
    ("time_per_step_s", "s/step", "{:.3f}"),
    ("tokens_per_s", "tok/s", "{:.0f}"),
    ("peak_memory_mb", "peak MB", "{:.0f}"),
    ("planned_peak_mb", "plan MB", "{:.0f}"),
    ("saved_mb", "file MB", "{:.2f}"),
    ("full_copy_mb", "full copy MB", "{:.0f}"),
    ("forgetting", "forgetting Δppl", "{:+.3f}"),
]


def build_rows(config: RunConfig, runs: dict[str, dict], plans: dict, forgot: dict | None) -> list[dict]:
    rows = []
    for name, summary in runs.items():
        plan = plans.get(name)
        row: dict[str, Any] = {"method": name}
        if "error" in summary:
            row["error"] = summary["error"]
        else:
            metric = summary.get("metric") or "accuracy"
            row.update(
                metric=metric, score=(summary.get("final_eval") or {}).get(metric),
                trainable_params=summary["trainable_params"],
                trainable_percent=summary["trainable_percent"],
                wall_time_s=summary["wall_time_s"], time_per_step_s=summary["time_per_step_s"],
                tokens_per_s=summary["tokens_per_s"], steps=summary["steps"],
                peak_memory_mb=summary["peak_memory_bytes"] / MB,
                peak_memory_kind=summary["peak_memory_kind"],
                saved_mb=summary["saved_size_bytes"] / MB,
                full_copy_mb=4 * (summary["total_params"] - (0 if name == "full" else summary["trainable_params"])) / MB,
                lr=summary.get("lr"), final_eval=summary.get("final_eval"),
                learned=summary.get("learned"),
                not_learned_why=(summary.get("did_not_learn") or {}).get("reason"),
                no_skill=(summary.get("final_eval") or {}).get("majority_share"))
            if row["no_skill"] is not None:
                row["no_skill_kind"] = "majority class"
            base = summary.get("base_score")  # generation: the untrained base (compare/base_score.py)
            if base:
                row.update(no_skill=base["score"], no_skill_kind=base["kind"], base_score=base["score"],
                           base_margin=base["margin"], base_examples=base["examples"])
        if plan is not None:  # after a search: the configuration the final runs used
            row["planned_peak_mb"] = plan.predicted_peak_bytes / MB
            row["planned_trainable_params"] = plan.trainable_params
            if "peak_memory_mb" in row:
                row["plan_error_percent"] = 100 * (row["planned_peak_mb"] / row["peak_memory_mb"] - 1)
        if forgot is not None:
            row["forgetting"] = (forgot.get(name) or {}).get("delta")
            row["perplexity"] = (forgot.get(name) or {}).get("perplexity")
            row["base_perplexity"] = forgot["base"]["perplexity"]
        rows.append(row)
    return rows


def format_table(rows: list[dict], markdown: bool = False) -> str:
    columns = [c for c in COLUMNS if c[0] in ("method", "score") or any(c[0] in r for r in rows)]

    def cell(row: dict, key: str, fmt: str) -> str:
        if key == "forgetting" and row.get(key) is None and "base_perplexity" not in row:
            return "n/a"
        if "error" in row and key not in ("method",):
            return "failed" if key == "score" else ""
        if key == "score" and not learned(row):
            return f"{fmt.format(row[key])} (did not learn)" if row.get(key) is not None else "did not learn"
        value = row.get(key)
        if value is not None and row.get(f"{key}_std") is not None:  # mean ± std over seeds
            std = fmt.format(row[f"{key}_std"]).lstrip("+")
            return fmt.format(value) + " ± " + (std[:-1] if std.endswith("%") else std)
        return "—" if value is None else fmt.format(value)

    table = [[h for _, h, _ in columns]] + [[cell(r, k, f) for k, _, f in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(r) + " |" for r in table[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in table)


def learned(row: dict) -> bool:
    """False when the run's evaluations stayed at the no-information level (training/collapse.py):
    the majority class, or no better than the label frequencies; for generation, a score not above
    the untrained base's (compare/base_score.py). Unknown counts as learned."""
    return row.get("learned") is not False


def reading(rows: list[dict], task: str) -> str:
    """A short, generated reading of the table: numbers only, no folklore."""
    ok = [r for r in rows if "error" not in r and r.get("score") is not None]
    lines = []
    base = next((r for r in ok if r.get("base_score") is not None), None)
    if base is not None:
        lines.append(f"- Untrained base: {base['metric']} {base['base_score']:.2%} on {base['base_examples']} "
                     f"eval rows, the no-skill level; a run counts as learned only when it scores above "
                     f"{base['base_score'] + base['base_margin']:.2%} (the base plus one standard error on "
                     "these rows, and at least one row).")
    for r in rows:
        if "error" in r:
            lines.append(f"- **{r['method']}** failed: {r['error']}")
    for r in ok:
        if not learned(r):
            lines.append(f"- **{r['method']} did not learn**: {r.get('not_learned_why') or 'no-information level'}; "
                         "its score is no result, and nothing below is drawn from it.")
        elif r.get("not_learned_seeds"):
            lines.append(f"- {r['method']}: {r['not_learned_seeds']} of {r.get('seeds', 1)} seeds did not learn; "
                         "its mean includes them.")
    for r in rows:
        if r.get("search_indistinct"):
            lines.append(f"- {r['method']}: its search could not tell the trials apart "
                         f"({r['search_indistinct']}); the final runs use the method's defaults.")
    if not ok:
        return "\n".join(lines)
    idle = ok
    ok = [r for r in ok if learned(r)]
    if ok:
        lines += _ranking(ok)
    else:
        top = max(idle, key=lambda r: r["score"])
        lines.append(f"- Best task score: none — no method learned (the highest, {top['method']} "
                     f"{top['score']:.2%}, is at the no-information level); there is no ranking to read here.")
    if task == "causal-lm":
        forgot = [r for r in ok if r.get("forgetting") is not None]
        if forgot:
            most = max(forgot, key=lambda r: r["forgetting"])
            least = min(forgot, key=lambda r: r["forgetting"])
            lines.append(f"- Forgetting (general-text perplexity, tuned minus base "
                         f"{ok[0]['base_perplexity']:.2f}): most {most['method']} "
                         f"({most['forgetting']:+.3f}), least {least['method']} ({least['forgetting']:+.3f}).")
    else:
        lines.append("- Forgetting is measured for causal LMs (perplexity on general text); it does not "
                     "apply to an encoder with a new classification head.")
    return "\n".join(lines)


def _ranking(ok: list[dict]) -> list[str]:
    """The reading's comparisons, over rows that learned."""
    lines = []
    best = max(ok, key=lambda r: r["score"])
    lines.append(f"- Best task score: **{best['method']}** ({best['score']:.2%}).")
    full = next((r for r in ok if r["method"] == "full"), None)
    if full:
        for r in ok:
            if r is full:
                continue
            gap = 100 * (full["score"] - r["score"])
            where = ("level with" if level(full, r) else
                     f"{gap:.1f} points behind" if gap > 0 else f"{-gap:.1f} points ahead of")
            lines.append(
                f"- {r['method']}: {where} full fine-tuning, training "
                f"{r['trainable_percent']:.3f}% of the parameters, {r['time_per_step_s'] / full['time_per_step_s']:.2f}x "
                f"its step time, {r['peak_memory_mb'] / full['peak_memory_mb']:.2f}x its peak memory, "
                f"a {r['saved_mb']:.2f} MB file instead of {full['saved_mb']:.0f} MB.")
    fastest = min(ok, key=lambda r: r["time_per_step_s"])
    lines.append(f"- Fastest step: {fastest['method']} ({fastest['time_per_step_s']:.3f} s).")
    planned = [r for r in ok if "plan_error_percent" in r]
    if planned:
        worst = max(planned, key=lambda r: abs(r["plan_error_percent"]))
        lines.append(f"- `plan`'s predicted peak memory was off from the measured peak by at most "
                     f"{abs(worst['plan_error_percent']):.0f}% (worst: {worst['method']}, "
                     f"{worst['planned_peak_mb']:.0f} MB planned vs {worst['peak_memory_mb']:.0f} MB measured).")
    return lines


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def place_labels(anchors: list[tuple[float, float]], sizes: list[tuple[float, float]],
                 offset: tuple[float, float] = (8.0, 6.0), gap: float = 2.0) -> list[tuple[float, float]]:
    """Label positions (lower-left corners, in pixels) beside each anchor point so that no two
    label boxes overlap: a label that would cover an earlier one moves down (then up) a line at
    a time. Points with tied scores otherwise print their labels on top of each other."""
    placed: list[tuple[float, float, float, float]] = []
    positions = []
    for (x, y), (w, h) in zip(anchors, sizes):
        base_x, base_y = x + offset[0], y + offset[1]
        for shift in range(0, 200):
            step = (shift + 1) // 2 * (h + gap) * (-1 if shift % 2 else 1)  # 0, -1, +1, -2, +2 lines ...
            box = (base_x, base_y + step, base_x + w, base_y + step + h)
            if all(box[2] <= p[0] or box[0] >= p[2] or box[3] <= p[1] or box[1] >= p[3] for p in placed):
                break
        placed.append(box)
        positions.append((box[0], box[1]))
    return positions


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r and r.get("score") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    peak = max((r["peak_memory_mb"] for r in ok), default=1.0)
    for r in ok:
        size = 80 + 900 * r["peak_memory_mb"] / peak
        if learned(r):
            ax.scatter(r["trainable_params"], 100 * r["score"], s=size, alpha=0.55)
        else:  # a hollow grey marker: no result
            ax.scatter(r["trainable_params"], 100 * r["score"], s=size, facecolors="none", edgecolors="0.4",
                       linestyle="--")
        if r.get("score_std"):  # std over seeds
            ax.errorbar(r["trainable_params"], 100 * r["score"], yerr=100 * r["score_std"], fmt="none",
                        ecolor="0.3", capsize=4)
    no_skill = [r["no_skill"] for r in ok if r.get("no_skill") is not None]
    if no_skill and ok[0].get("metric") in ("accuracy", "exact_match"):
        kind = ok[0].get("no_skill_kind") or "majority class"
        ax.axhline(100 * max(no_skill), color="0.35", linestyle=":", linewidth=1.2,
                   label=f"no skill: {kind} {100 * max(no_skill):.1f}%")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.15)  # room for the labels beside the largest markers
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"{ok[0]['metric'] if ok else 'score'} (%)")
    ax.set_title(title + "\n(marker size: peak memory; hollow: did not learn)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.canvas.draw()  # the data-to-pixel transform is final only now
    texts = [f"{r['method']}{'' if learned(r) else ' (did not learn)'}\n{r['peak_memory_mb']:.0f} MB" for r in ok]
    anchors = [tuple(ax.transData.transform((r["trainable_params"], 100 * r["score"]))) for r in ok]
    px_per_pt = fig.dpi / 72
    sizes = [(8 * 0.62 * max(map(len, t.splitlines())) * px_per_pt + 4, 2 * 8 * 1.25 * px_per_pt + 2) for t in texts]
    order = sorted(range(len(ok)), key=lambda i: (anchors[i][0], -anchors[i][1]))
    placed = place_labels([anchors[i] for i in order], [sizes[i] for i in order])
    for i, (lx, ly) in zip(order, placed):
        ax.annotate(texts[i], (ok[i]["trainable_params"], 100 * ok[i]["score"]), textcoords="offset points",
                    xytext=((lx - anchors[i][0]) / px_per_pt, (ly - anchors[i][1]) / px_per_pt), fontsize=8,
                    va="bottom", ha="left",
                    arrowprops=({"arrowstyle": "-", "color": "0.6", "lw": 0.6}
                                if abs(ly - anchors[i][1] - 6.0) > 1 else None))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    _atomic_write(path, buffer.getvalue())


def write_outputs(out_dir: Path, config: RunConfig, runs: dict, plans: dict, forgot: dict | None,
                  rows: list[dict] | None = None, sections: list[tuple[str, str]] = (),
                  note: str | None = None) -> list[dict]:
    """`rows`: already built (compare.fair: averaged over seeds); `sections`: (heading, markdown)
    after the reading; `note`: how the runs differ from one plain run each."""
    rows = build_rows(config, runs, plans, forgot) if rows is None else rows
    table = format_table(rows)
    print("\n" + table + "\n")
    _atomic_write(out_dir / "results.json", (json.dumps(rows, indent=2, default=str) + "\n").encode())
    buffer = io.StringIO()
    keys = sorted({k for r in rows for k in r if k not in ("final_eval", "search")})
    writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(out_dir / "results.csv", buffer.getvalue().encode())
    title = f"{config.model} on {Path(config.data.train or config.data.eval).parent.name}"
    plot(rows, out_dir / "tradeoffs.png", title)
    budget = (f"{config.data.max_train_rows or 'all'} training rows, {config.train.epochs} epoch(s), "
              f"batch {config.train.batch_size}, max length {config.data.max_length}")
    report = (f"# Method comparison: {title}\n\nSame data, budget and seed for every method "
              f"({budget}{'; ' + note if note else ''}); each trained in its own process.\n\n"
              f"{format_table(rows, markdown=True)}\n\n"
              f"## Reading\n\n{reading(rows, config.task)}\n\n![trade-offs](tradeoffs.png)\n")
    report += "".join(f"\n## {heading}\n\n{text}\n" for heading, text in sections)
    _atomic_write(out_dir / "report.md", report.encode())
    return rows
