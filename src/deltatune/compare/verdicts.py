"""report.md's closing verdicts on the seed's claims, computed from the numbers and their spread.

The claims (from the project's seed): full fine-tuning "often achieves the highest performance";
PEFT cuts memory and storage; PEFT "avoids catastrophic forgetting"; PEFT shines when data is
small. Each verdict names the numbers it rests on; "level" means within noise (compare.repeats).
"""
from __future__ import annotations

from deltatune.compare.report import learned
from deltatune.compare.repeats import level, noise, spread


def _pts(a: float) -> str:
    return f"{100 * a:.1f} points"


def _quality(ok: list[dict], full: dict | None) -> str:
    best = max(ok, key=lambda r: r["score"])
    tied = [r["method"] for r in ok if r is not best and level(r, best)]
    text = (f"**Highest quality** — best mean score: {best['method']} "
            f"({100 * best['score']:.1f}%{spread(best, 'score', 100)})")
    text += f", level within noise with {', '.join(tied)}." if tied else ", ahead of every other method beyond noise."
    if full is None:
        return text + " (full fine-tuning was not in this comparison.)"
    peft = [r for r in ok if r is not full]
    if not peft:
        return text
    best_peft = max(peft, key=lambda r: r["score"])
    gap = full["score"] - best_peft["score"]
    margin = noise(full, best_peft)
    within = f" (noise: ±{_pts(margin)})" if margin is not None else " (one seed: no spread measured)"
    if level(full, best_peft):
        verdict = "not supported here: full fine-tuning is level with the best PEFT method"
    elif gap > 0:
        verdict = "holds here"
    else:
        verdict = "does not hold here: a PEFT method beats full fine-tuning"
    return (text + f" Claim \"full fine-tuning often achieves the highest performance\": {verdict} — "
            f"full {100 * full['score']:.1f}% vs best PEFT {best_peft['method']} {100 * best_peft['score']:.1f}%, "
            f"a gap of {gap * 100:+.1f} points{within}.")


def _cost(ok: list[dict], full: dict | None) -> str:
    if full is None or not full.get("peak_memory_mb"):
        return "**Memory and storage** — no full fine-tuning row to compare against."
    peft = [r for r in ok if r is not full and r.get("peak_memory_mb")]
    if not peft:
        return "**Memory and storage** — no PEFT row."
    memory = [r["peak_memory_mb"] / full["peak_memory_mb"] for r in peft]
    storage = [full["saved_mb"] / max(r["saved_mb"], 1e-9) for r in peft]
    verdict = "holds" if max(memory) < 1 and min(storage) > 1 else "holds only in part"
    each = ", ".join("{} {:.2f}x".format(r["method"], r["peak_memory_mb"] / full["peak_memory_mb"]) for r in peft)
    return (f"**Memory and storage** — claim \"PEFT cuts memory and storage\": {verdict}. Peak memory "
            f"{min(memory):.2f}–{max(memory):.2f}x of full fine-tuning's "
            f"({each}); "
            f"the saved delta is {min(storage):,.0f}–{max(storage):,.0f}x smaller than full's "
            f"{full['saved_mb']:.1f} MB.")


def _forgetting(ok: list[dict], full: dict | None, task: str) -> str:
    if task != "causal-lm":
        return ("**Forgetting** — not measured: an encoder with a new classification head has no general-text "
                "ability to lose (forgetting is measured for causal LMs as general-text perplexity, tuned minus base).")
    rows = [r for r in ok if r.get("forgetting") is not None]
    if not rows:
        return "**Forgetting** — no run measured."
    order = sorted(rows, key=lambda r: r["forgetting"])
    listed = ", ".join(f"{r['method']} {r['forgetting']:+.2f}{spread(r, 'forgetting', 1, 2)}" for r in order)
    text = f"**Forgetting** — general-text Δppl, least to most: {listed}."
    if full is None or full.get("forgetting") is None:
        return text
    worse = [r["method"] for r in rows if r is not full and r["forgetting"] > full["forgetting"]
             and not level(r, full, "forgetting")]
    better = [r["method"] for r in rows if r is not full and r["forgetting"] < full["forgetting"]
              and not level(r, full, "forgetting")]
    if worse:
        verdict = f"does not hold for {', '.join(worse)} (forgot more than full fine-tuning)"
    elif len(better) == len(rows) - 1:
        verdict = "holds: every PEFT method forgot less than full fine-tuning"
    else:
        verdict = "holds only in part: some PEFT methods are level with full fine-tuning"
    return text + f" Claim \"PEFT avoids catastrophic forgetting\": {verdict}."


def _small_data(curves: dict | None) -> str:
    if not curves or len(curves) < 2:
        return ("**Small data** — not measured: set compare.data_sizes (e.g. [250, 1000]) for learning curves.")
    sizes = sorted(curves)

    def gap_at(size: int) -> tuple[float, dict, dict] | None:
        ok = [r for r in curves[size] if "error" not in r and r.get("score") is not None and learned(r)]
        full = next((r for r in ok if r["method"] == "full"), None)
        peft = [r for r in ok if r is not full]
        if full is None or not peft:
            return None
        best = max(peft, key=lambda r: r["score"])
        return best["score"] - full["score"], best, full

    small, large = gap_at(sizes[0]), gap_at(sizes[-1])
    if small is None or large is None:
        return "**Small data** — full fine-tuning or every PEFT method failed at some size."
    (gs, bs, fs), (gl, bl, fl) = small, large
    small_noise = noise(bs, fs)
    if gs > 0 and not level(bs, fs):
        verdict = "holds"
    elif level(bs, fs) and small_noise is not None:
        verdict = (f"not supported: at {sizes[0]:,} rows the best PEFT method is level with full fine-tuning "
                   f"(within noise, ±{100 * small_noise:.1f} points)")
    elif gs > gl and (gs - gl) > (noise(bs, fs) or 0.0):
        verdict = "holds in part (PEFT's standing relative to full improves as data shrinks)"
    else:
        verdict = "does not hold here"
    if small_noise is None and verdict.startswith("holds"):
        # one seed at the smallest size (compare.curve_seeds, or one seed throughout): a gap
        # without a spread to hold it against is a direction, not a finding
        verdict += (f" on one seed at {sizes[0]:,} rows, with no spread there to tell it from noise "
                    f"(more compare.curve_seeds would give one)")
    return (f"**Small data** — claim \"PEFT shines when data is small\": {verdict}. Best PEFT minus full: "
            f"{gs * 100:+.1f} points at {sizes[0]:,} rows ({bs['method']}), {gl * 100:+.1f} at {sizes[-1]:,} rows "
            f"({bl['method']}).")


def verdicts(rows: list[dict], curves: dict | None, task: str, searched: dict | None = None) -> str:
    finished = [r for r in rows if "error" not in r and r.get("score") is not None]
    ok = [r for r in finished if learned(r)]
    idle = [r["method"] for r in finished if not learned(r)]
    aside = (f"Left out of every verdict — did not learn: {', '.join(idle)}." if idle else "")
    if not ok:
        return ("No method learned; no verdict. " + aside).strip() if finished else "No method finished; no verdict."
    full = next((r for r in ok if r["method"] == "full"), None)
    items = ["- " + _quality(ok, full), "- " + _cost(ok, full), "- " + _forgetting(ok, full, task),
             "- " + _small_data(curves)]
    blind = [f"{name} ({result['indistinct']})" for name, result in (searched or {}).items() if result.get("indistinct")]
    if blind:
        items.append("- **Search** — could not tell the trials apart, so these ran at the method's defaults "
                     "rather than tuned settings: " + "; ".join(blind) + ".")
    if aside:
        items.append("- " + aside)
    return "\n\n".join(items)
