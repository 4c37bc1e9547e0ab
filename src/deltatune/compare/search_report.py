"""report.md's search sections: each method's best settings, every trial, the parameters'
importances (Optuna's evaluator), and search.png, the held-out score over the trials."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Callable

from deltatune.compare.space import describe


def _value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _params(params: dict) -> str:
    return ", ".join(f"{k}={_value(v)}" for k, v in params.items()) or "—"


def _score(c: dict) -> str:
    if c.get("score") is None:
        return "—"
    metric = c.get("metric", "")
    return f"{c['score']:.4f}" if metric == "perplexity" else f"{100 * c['score']:.2f}%"


def edge_remark(name: str, result: dict, search: dict) -> str | None:
    """"At the edge of its range", said only when the edge value really scored best: the chosen
    trial beat (by score, or by held-out loss on a tied score) every trial at another value."""
    chosen = result["chosen"]
    if not chosen:
        return None
    ok = [c for c in result["candidates"] if c["status"] == "ok"]
    for key, value in chosen["params"].items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        tried = sorted({c["params"][key] for c in ok if isinstance(c["params"].get(key), (int, float))})
        if len(tried) < 3 or value not in (tried[0], tried[-1]):
            continue
        others = [c for c in ok if c["params"].get(key) != value]
        if all((c["score"], -(c.get("loss") or math.inf)) < (chosen["score"], -(chosen.get("loss") or math.inf))
               for c in others):
            side = "lowest" if value == tried[0] else "highest"
            return (f"{name}: the best {key} ({_value(value)}) is the {side} tried — a wider range may do "
                    "better (a short search also tends to favour larger lrs than a longer run would).")
    return None


def trials_table(result: dict) -> str:
    lines = ["| trial | parameters | held-out score | held-out loss | status |", "|---|---|---|---|---|"]
    for c in result["candidates"]:
        status = c["status"]
        if status == "ok":
            status = "did not learn" if c.get("learned") is False else "complete"
        elif status == "pruned":
            status = f"pruned at step {c.get('step')}"
        else:
            status = f"**{status}** ({(c.get('why') or '')[:80]})"
        loss = c.get("loss")
        lines.append(f"| {c['number']} | {_params(c['params'])} | {_score(c)} | "
                     f"{'—' if loss is None else f'{loss:.4f}'} | {status} |")
    return "\n".join(lines)


def importances(storage, name: str) -> dict[str, float] | None:
    """Optuna's importance of each searched parameter, or None when it cannot be told (fewer than
    two finished trials, or one parameter only)."""
    import optuna

    study = optuna.load_study(study_name=name, storage=storage)
    finished = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    names = {k for t in finished for k in t.params}
    if len(finished) < 2 or len(names) < 2:
        return None
    try:
        return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):  # e.g. every finished trial scored the same
        return None


def plot_search(searched: dict[str, dict], path: Path, write: Callable[[Path, bytes], None]) -> None:
    """search.png: each method's held-out score per trial (x: pruned at its last report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    metric = "score"
    for name, result in searched.items():
        ok = [c for c in result["candidates"] if c["status"] == "ok"]
        pruned = [c for c in result["candidates"] if c["status"] == "pruned" and c.get("score") is not None]
        if ok:
            metric = ok[0]["metric"]
        scale = 1.0 if metric == "perplexity" else 100.0
        line = ax.plot([c["number"] for c in ok], [scale * c["score"] for c in ok], marker="o", label=name)
        if pruned:
            ax.scatter([c["number"] for c in pruned], [scale * c["score"] for c in pruned], marker="x",
                       color=line[0].get_color())
    ax.set_xlabel("trial")
    ax.set_ylabel(f"held-out {metric}" + ("" if metric == "perplexity" else " (%)"))
    ax.set_title("search: held-out score per trial (x: pruned, at its last report)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write(path, buffer.getvalue())


def search_sections(searched: dict[str, dict], search: dict, storage, out_dir: Path,
                    write: Callable[[Path, bytes], None]) -> list[tuple[str, str]]:
    intro = (f"An Optuna study per method ({search['rows']} training rows to fit, {search['heldout_rows']} other "
             f"training rows to score; the eval file is not used; pruner: {search['pruner']}). "
             f"Storage: `{storage.url}` (open it with `optuna-dashboard {storage.url}`).")
    lines = [intro, "", "| method | searched | trials (complete / pruned / failed) | best configuration | "
                        "best held-out score |", "|---|---|---|---|---|"]
    notes = []
    for name, result in searched.items():
        counts = [sum(c["status"] == s for c in result["candidates"]) for s in ("ok", "pruned")]
        failed = len(result["candidates"]) - sum(counts)
        space = search["spaces"].get(name)
        what = describe(space) if space else "lr grid " + ", ".join(
            _value(g["lr"]) for g in search["grids"].get(name, []))
        best = result["best"]
        if result["indistinct"]:
            chosen = f"the method's defaults (trials could not be told apart)"
            notes.append(f"- **{name}**: the search could not tell its trials apart — {result['indistinct']}; "
                         "the final runs use the method's defaults, not a searched setting.")
        elif best is None:
            chosen = "none: every trial failed"
        else:
            chosen = _params(best["params"])
        lines.append(f"| {name} | {what} | {counts[0]} / {counts[1]} / {failed} | {chosen} | "
                     f"{_score(best) if best else '—'} |")
        remark = None if result["indistinct"] else edge_remark(name, result, search)
        if remark:
            notes.append(f"- {remark}")
    if notes:
        lines += [""] + notes
    plot_search(searched, out_dir / "search.png", write)
    lines += ["", "![held-out score per trial](search.png)"]
    sections = [("Search", "\n".join(lines))]
    detail = []
    for name, result in searched.items():
        detail.append(f"### {name}\n\n{trials_table(result)}")
        weights = importances(storage, result["study"])
        if weights:
            detail.append("Importance of each parameter (Optuna's evaluator): " +
                          ", ".join(f"{k} {v:.2f}" for k, v in weights.items()) + ".")
    sections.append(("Search trials", "\n\n".join(detail)))
    return sections
