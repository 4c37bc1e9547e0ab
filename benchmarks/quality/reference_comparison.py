"""Record a finished reference comparison: `deltatune compare` with an Optuna search, several
seeds and a learning curve. Nothing is run; everything is read from the comparison's own outputs:

    python benchmarks/quality/reference_comparison.py --from OUT_DIR --config CONFIG.yaml --name NAME [--contended]

- results.json (one row per method, averaged over the seeds; each row's search trials and chosen
  settings), curves.json (the rows per training-data size) and config.yaml (the settings that ran:
  the budget) -> one raw result, results/quality/<date>-NAME-<cpu kind>.json, dated by the day
  the comparison wrote results.json (recording the same rows again replaces that file); `make
  report` renders it (renderer `reference-comparison`);
- report.md -> docs/reports/compare-NAME.md, with a generated paragraph on top (date, CPU flags,
  command, budget), its images (tradeoffs.png, curves.png, search.png) copied to
  docs/images/compare-NAME-*.png and its links pointed there.

`--contended`: the comparison shared the machine with other jobs, so its wall and step times are
higher than the machine's own; the docs paragraph and the RESULTS.md caption say so.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the common package
from common import machine  # noqa: E402

DOCS = machine.ROOT / "docs"
IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s/]+)\.png\)")
CONTENDED = ("The comparison ran beside other jobs on this machine: the wall s, s/step and tok/s "
             "columns are contended (higher than the machine's own figures) and only their ratios "
             "within a table mean anything; scores, learning rates, memory and file sizes do not "
             "depend on speed.")


class RecordError(Exception):
    """One line naming the file and what was expected."""


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise RecordError(f"{path}: not found — {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path}: not JSON ({exc})") from None


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def search_summary(rows: list[dict]) -> dict[str, dict]:
    """Per method: the trials' outcomes, the chosen settings, and why the trials could not be told
    apart (compare/fair.py stores each row's trials as `search`, the chosen settings as
    `chosen_params` and the reason as `search_indistinct`), counted as the report's Search table."""
    found = {}
    for row in rows:
        if "search" not in row:
            continue
        trials = row["search"]
        complete = [t for t in trials if t["status"] == "ok"]
        pruned = sum(t["status"] == "pruned" for t in trials)
        best = max((t["score"] for t in complete if t.get("score") is not None), default=None)
        found[row["method"]] = {
            "trials": len(trials), "complete": len(complete), "pruned": pruned,
            "failed": len(trials) - len(complete) - pruned,
            "did_not_learn": sum(t.get("learned") is False for t in complete),
            "chosen": row.get("chosen_params"), "indistinct": row.get("search_indistinct"),
            "best_heldout_score": best}
    return found


def budget(run_config: Path) -> dict:
    """The settings the comparison ran with, from the config.yaml it saved in its output
    directory, read (and defaults filled) as `deltatune compare` reads them."""
    from deltatune.compare.settings import read_compare_config

    config, settings = read_compare_config(str(run_config), [])
    search = settings["search"] or {}
    return {"model": config.model, "task": config.task, "data": Path(config.data.train).parent.name,
            "rows": config.data.max_train_rows, "epochs": config.train.epochs,
            "batch": config.train.batch_size, "max_length": config.data.max_length,
            "seeds": settings["seeds"], "data_sizes": settings["data_sizes"],
            "curve_seeds": settings["curve_seeds"],
            "methods": settings["methods"], "workers": settings["workers"],
            "search": {k: search.get(k) for k in ("trials", "steps", "rows", "heldout_rows", "pruner")}
            if search else None}


def budget_line(b: dict) -> str:
    sizes = sorted({*b["data_sizes"], *([b["rows"]] if b["rows"] else [])})
    search = b["search"]
    line = ""
    if search:
        steps = f"{search['steps']} steps" if search["steps"] else "the run's epochs"
        line = (f"search: {search['trials']} Optuna trials per method ({steps} of batch {b['batch']} on "
                f"{search['rows']:,} training rows, scored on {search['heldout_rows']:,} other training "
                f"rows; pruner {search['pruner']}); ")
    rows = f"{b['rows']:,}" if b["rows"] else "all"
    return (line + f"final runs: {rows} training rows, {b['epochs']:g} epoch(s), batch "
            f"{b['batch']}, max length {b['max_length']}, seeds {', '.join(map(str, b['seeds']))}; "
            f"learning curve at {', '.join(f'{s:,}' for s in sizes)} rows"
            + _curve_seeds(b))


def _curve_seeds(b: dict) -> str:
    """The smaller sizes' seeds, when fewer than the full size's (older records have no key)."""
    seeds = b.get("curve_seeds") or b["seeds"]
    return "" if seeds == b["seeds"] else f" (the smaller sizes over seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))})"


def _same_comparison(config: Path, run_config: Path) -> None:
    """The config given must be the one that made OUT_DIR: their `compare:` sections agree."""
    given = (yaml.safe_load(config.read_text()) or {}).get("compare")
    ran = (yaml.safe_load(run_config.read_text()) or {}).get("compare")
    if given != ran:
        raise RecordError(f"{config}: its compare: section differs from the one in {run_config}; "
                          "pass the config that made this output directory")


def copy_report(source: Path, name: str, intro: str, docs: Path, shown_out: str | None) -> Path:
    """report.md -> docs/reports/compare-NAME.md, the intro under its title; each image it links
    copied to docs/images/compare-NAME-IMAGE.png and the link pointed there."""
    text = (source / "report.md").read_text()
    images = []

    def relink(match: re.Match) -> str:
        stem = match.group(2)
        image = source / f"{stem}.png"
        if not image.is_file():
            raise RecordError(f"{source / 'report.md'}: links {stem}.png, which is not in {source}")
        target = f"compare-{name}-{stem}.png"
        images.append((image, docs / "images" / target))
        return f"![{match.group(1)}](../images/{target})"

    text = IMAGE_LINK.sub(relink, text)
    if shown_out:  # the study's storage URL names this machine's path: show the config's own
        text = text.replace(str(source.resolve()), shown_out)
    title, _, body = text.partition("\n")
    text = f"{title}\n\n{intro}\n{body}" if title.startswith("# ") else f"{intro}\n\n{text}"
    for image, target in images:
        _atomic_write(target, image.read_bytes())
    out = docs / "reports" / f"compare-{name}.md"
    _atomic_write(out, text.encode())
    print(f"wrote {out} and {len(images)} image(s)")
    return out


def earlier_record(name: str, rows: list[dict]) -> Path | None:
    """The result file that already records these rows under this name: recording the same
    comparison again replaces it rather than adding a second copy (-2) to RESULTS.md."""
    for path in sorted((machine.RESULTS / "quality").glob(f"*-{name}-*.json")):
        try:
            if json.loads(path.read_text()).get("rows") == rows:
                return path
        except (OSError, json.JSONDecodeError):
            continue
    return None


def record(source: Path, config: Path, name: str, contended: bool = False, docs: Path = DOCS,
           result: Path | None = None) -> Path:
    """Write the raw result and the docs report; returns the raw result's path."""
    source = Path(source)
    rows = _read_json(source / "results.json", "the comparison has not finished (results.json is "
                      "written last)")
    curves = _read_json(source / "curves.json", "the comparison ran no learning curve (compare.data_sizes)")
    run_config = source / "config.yaml"
    if not run_config.is_file():
        raise RecordError(f"{run_config}: not found — not a `deltatune compare` output directory")
    if not (source / "report.md").is_file():
        raise RecordError(f"{source / 'report.md'}: not found — the comparison has not finished")
    if not Path(config).is_file():
        raise RecordError(f"{config}: not found")
    _same_comparison(Path(config), run_config)
    settings = budget(run_config)
    search = search_summary(rows)
    if settings["search"] and not search:
        raise RecordError(f"{source / 'results.json'}: no row carries its search trials, though "
                          f"{run_config} names a search")
    written = datetime.datetime.fromtimestamp((source / "results.json").stat().st_mtime, datetime.timezone.utc)
    date = written.date().isoformat()
    flags = machine.cpu_flags()
    command = f"deltatune compare {config}"
    data = {
        "date": date, "machine": machine.describe(), "cpu_flags": flags, "precision": "bf16 autocast",
        "command": command, "config": str(config), "config_text": Path(config).read_text(),
        "contended": contended, "budget": settings, "rows": rows,
        "curves": curves, "search": search, "report": f"docs/reports/compare-{name}.md"}
    given_out = (yaml.safe_load(Path(config).read_text()) or {}).get("output_dir")
    intro = (f"Made by `{command}` on {date} (CPU flags {' '.join(flags) or 'none'}; "
             f"{machine.describe()}). Budget: {budget_line(settings)}."
             + (f" {CONTENDED}" if contended else "")
             + f" Raw numbers: `benchmarks/results/quality/` (`{name}`).")
    copy_report(source, name, intro, Path(docs), given_out)
    return machine.write_result(data, "quality", name,
                                result or earlier_record(name, rows) or machine.result_path("quality", name, date=date))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True, help="the finished compare output directory")
    parser.add_argument("--config", required=True, help="the compare config that made it")
    parser.add_argument("--name", required=True, help="the result's name, e.g. reference-minilm")
    parser.add_argument("--contended", action="store_true",
                        help="the comparison ran beside other jobs: its wall and step times are contended")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", args.name):
        parser.error(f"--name {args.name!r}: lower-case letters, digits and dashes")
    from deltatune.errors import DeltatuneError

    try:
        record(Path(args.source), Path(args.config), args.name, args.contended)
    except (RecordError, DeltatuneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
