"""The fair comparison: search on held-out training rows, seeds, curves, reuse of finished runs."""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from tiny_runs import sentiment_rows, tiny_bert_dir, write_config, write_jsonl

from deltatune.cli import main
from deltatune.compare.search import candidate_lrs, choose, judge, read_search
from deltatune.errors import DeltatuneError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_bert_dir(tmp_path_factory.mktemp("fair"))


def comparison(root: Path, model_dir: Path, compare: dict, train_rows: int = 96, poison_eval: bool = False) -> Path:
    write_jsonl(root / "train.jsonl", sentiment_rows(train_rows, seed=1))
    if poison_eval:  # any read of it fails loudly: the search must never open it
        (root / "dev.jsonl").write_text("POISON: the search read the eval file\n")
    else:
        write_jsonl(root / "dev.jsonl", sentiment_rows(32, seed=2))
    return write_config(root / "compare.yaml", {
        "model": str(model_dir), "task": "classification",
        "data": {"train": str(root / "train.jsonl"), "eval": str(root / "dev.jsonl"), "max_length": 32},
        "method": {"name": "lora"},
        "train": {"epochs": 1, "batch_size": 8, "bf16": False},
        "output_dir": str(root / "cmp"), "compare": compare})


def test_search_picks_best_heldout_lr_never_reads_eval_and_skips_diverged(tmp_path, model_dir, capsys):
    # lr 1e4 blows up: the search must record it as diverged and never choose it, pick the better
    # held-out score of the other two, and never touch the (poisoned) eval file.
    config = comparison(tmp_path, model_dir, {
        "methods": ["full"],
        "search": {"lr": [1e-7, 3e-3, 1e4], "rows": 64, "heldout_rows": 32, "steps": 12, "pruner": "none"}},
        poison_eval=True)
    assert main(["compare", str(config)]) == 0
    out = tmp_path / "cmp"
    [row] = json.loads((out / "results.json").read_text())
    by_lr = {c["params"]["lr"]: c for c in row["search"]}
    assert by_lr[1e4]["status"] == "diverged" and by_lr[1e4]["why"]
    assert by_lr[1e-7]["status"] == by_lr[3e-3]["status"] == "ok"
    best = max((c for c in row["search"] if c["status"] == "ok"), key=lambda c: (c["score"], -c["loss"]))
    assert row["chosen_lr"] == best["params"]["lr"] or row.get("search_indistinct")
    for lr in (1e-7, 3e-3):  # each score is the trial's own held-out accuracy
        summary = json.loads((out / "runs" / f"search-full-t{by_lr[lr]['number']}" / "summary.json").read_text())
        assert by_lr[lr]["score"] == summary["final_eval"]["accuracy"]
    # the candidates were scored on held-out rows of the TRAINING file, disjoint from their fit rows
    train_rows = [json.loads(l) for l in (tmp_path / "train.jsonl").read_text().splitlines()]
    fit = [json.loads(l) for l in (out / "search" / "fit.jsonl").read_text().splitlines()]
    heldout = [json.loads(l) for l in (out / "search" / "heldout.jsonl").read_text().splitlines()]
    assert len(fit) == 64 and len(heldout) == 32
    key = lambda r: (r["text"], r["label"])  # noqa: E731
    assert {key(r) for r in fit} | {key(r) for r in heldout} <= {key(r) for r in train_rows}
    # disjoint as rows of the file (texts may repeat in this tiny vocabulary): 96 rows, all used once
    assert sorted(map(key, fit + heldout)) == sorted(map(key, train_rows))
    summary = json.loads((out / "runs" / f"search-full-t{by_lr[3e-3]['number']}" / "summary.json").read_text())
    assert summary["eval_examples"] == 32 and summary["train_examples"] == 64
    # the final run does read the eval file, and that is where the poison shows
    assert "error" in row and "dev.jsonl" in row["error"]
    report = (out / "report.md").read_text()
    assert "## Search" in report and "**diverged**" in report


def test_seeds_give_mean_and_std_curves_plot_and_reruns_reuse_or_refuse(tmp_path, model_dir, capsys):
    config = comparison(tmp_path, model_dir, {
        "methods": ["full", "lora"], "seeds": [0, 1], "data_sizes": [24], "workers": 2}, train_rows=48)
    assert main(["compare", str(config)]) == 0
    out = tmp_path / "cmp"
    printed = capsys.readouterr().out
    assert "run 8 of 8" in printed and "ETA" in printed
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    with open(out / "results.csv") as handle:
        csv_rows = {r["method"]: r for r in csv.DictReader(handle)}
    for name in ("full", "lora"):
        scores = [json.loads((out / "runs" / f"{name}-s{s}" / "summary.json").read_text())["final_eval"]["accuracy"]
                  for s in (0, 1)]
        assert rows[name]["seeds"] == 2 and rows[name]["scores"] == scores
        assert rows[name]["score"] == pytest.approx(statistics.fmean(scores))
        assert rows[name]["score_std"] == pytest.approx(statistics.stdev(scores))
        assert float(csv_rows[name]["score_std"]) == pytest.approx(statistics.stdev(scores))
    # the two seeds really are different runs (different head init and batch order)
    s0 = json.loads((out / "runs" / "lora-s0" / "summary.json").read_text())
    s1 = json.loads((out / "runs" / "lora-s1" / "summary.json").read_text())
    assert s0["final_eval"]["loss"] != s1["final_eval"]["loss"]
    report = (out / "report.md").read_text()
    assert " ± " in report and "## Learning curves" in report and "## Verdicts on the seed's claims" in report
    assert "24 rows" in report and "48 rows" in report
    curves = json.loads((out / "curves.json").read_text())
    assert sorted(map(int, curves)) == [24, 48]

    from PIL import Image

    with Image.open(out / "curves.png") as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    assert pixels.shape[0] >= 400 and pixels.shape[1] >= 600
    assert (pixels.std(axis=(0, 1)) > 10).all()                       # not a blank canvas
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50         # lines, markers, text

    # run again: nothing retrains
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    assert main(["compare", str(config)]) == 0
    assert capsys.readouterr().out.count("reused: finished earlier") == 8
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # a cheaper curve: its smaller size over seed 0 alone, the full size still over both seeds
    assert main(["compare", str(config), "compare.curve_seeds=[0]"]) == 0
    printed = capsys.readouterr().out
    assert "run 6 of 6" in printed and printed.count("reused: finished earlier") == 6
    curves = json.loads((out / "curves.json").read_text())
    for row in curves["24"]:
        run = json.loads((out / "runs" / f"{row['method']}-s0-n24" / "summary.json").read_text())
        assert row["seeds"] == 1 and row["score"] == run["final_eval"]["accuracy"]
    assert all(row["seeds"] == 2 for row in curves["48"])
    assert main(["compare", str(config)]) == 0  # back to both seeds at every size, all reused
    assert capsys.readouterr().out.count("reused: finished earlier") == 8
    # an interrupted run (no summary) is trained again, the finished ones are reused
    (out / "runs" / "lora-s1" / "summary.json").unlink()
    assert main(["compare", str(config)]) == 0
    assert capsys.readouterr().out.count("reused: finished earlier") == 7
    assert (out / "runs" / "lora-s1" / "summary.json").exists()
    # changed settings: the finished runs are stale, refused by name, rerun only with --overwrite
    assert main(["compare", str(config), "data.max_length=24"]) == 2
    error = capsys.readouterr().err
    assert "finished with other settings" in error and "max_length: 32 then, 24 now" in error
    # (one method's runs are enough to see --overwrite rerun them; the other's stay as they were)
    assert main(["compare", str(config), "data.max_length=24", "compare.methods=[lora]", "--overwrite"]) == 0
    assert "reused" not in capsys.readouterr().out
    lora = {p: t for p, t in mtimes.items() if p.parent.name.startswith("lora-")}
    assert len(lora) == 4 and all(p.stat().st_mtime_ns != t for p, t in lora.items())


def test_judge_and_choose_never_pick_a_diverged_candidate(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": l}) + "\n"
                                               for s, l in enumerate([0.70, 0.69, 0.68, 0.70, 0.95], 1)))
    rising = judge({"metric": "accuracy", "final_eval": {"accuracy": 0.99, "loss": 0.9}, "output_dir": str(run)})
    assert rising["status"] == "diverged" and "0.7000 to 0.9500" in rising["why"]
    nan = judge({"error": "step 3: the loss is nan (grad norm nan); lower train.lr, or ..."})
    assert nan["status"] == "diverged"
    assert judge({"metric": "accuracy", "final_eval": {"accuracy": math.nan, "loss": 0.7},
                  "output_dir": str(run)})["status"] == "diverged"
    candidates = [{"lr": 1.0, **rising}, {"lr": 2.0, **nan},
                  {"lr": 1e-3, "status": "ok", "score": 0.6, "metric": "accuracy"},
                  {"lr": 1e-4, "status": "ok", "score": 0.7, "metric": "accuracy"}]
    assert choose(candidates)["lr"] == 1e-4
    assert choose(candidates[:2]) is None
    # perplexity: lower is better
    assert choose([{"lr": 1, "status": "ok", "score": 9.0, "metric": "perplexity"},
                   {"lr": 2, "status": "ok", "score": 7.0, "metric": "perplexity"}])["lr"] == 2


def test_search_settings_are_validated_and_auto_grid_is_centred():
    search = read_search({"lr": "auto", "points": 3, "factor": 10}, ["lora"])
    assert candidate_lrs(search, "lora", 1e-3) == [1e-4, 1e-3, 1e-2]
    assert search["grids"]["lora"] == [{"lr": 1e-4}, {"lr": 1e-3}, {"lr": 1e-2}]
    per_method = read_search({"lr": {"prefix": [1e-3, 3e-3]}}, ["lora", "prefix"])
    assert per_method["grids"]["prefix"] == [{"lr": 1e-3}, {"lr": 3e-3}]
    # lr: auto without a grid: the lr alone, searched log-uniform around lora's default (1e-3)
    assert per_method["spaces"]["lora"] == {"lr": ("range", 1e-4, 1e-2, True)}
    assert read_search({}, ["lora"])["spaces"]["lora"]["r"] == ("choice", [4, 8, 16, 32])
    with pytest.raises(DeltatuneError, match="compare.search.lr: expected auto or a list"):
        read_search({"lr": [0.1, -1]}, ["lora"])
    with pytest.raises(DeltatuneError, match="compare.search.step: unknown key"):
        read_search({"step": 3}, ["lora"])
