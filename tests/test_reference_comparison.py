"""benchmarks/quality/reference_comparison.py records a finished comparison (search, seeds, a
learning curve) from its own outputs, and benchmarks/common/report.py renders the record.

The comparison here is the real `deltatune compare` (plans, Optuna studies, final runs, seeds,
curves, report, plots) with one stand-in: each training child is replaced by a function that
writes the summary.json a run writes, its score set by the lr, the seed and the rows, so the
whole output directory comes from the real writers in a few seconds."""
from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest
from tiny_runs import sentiment_rows, tiny_bert_dir, write_config, write_jsonl

from deltatune.compare import runner

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MB = 1024 * 1024


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


recorder = _load("reference_comparison", BENCHMARKS / "quality" / "reference_comparison.py")
report = _load("benchmarks_report_reference", BENCHMARKS / "common" / "report.py")


def stand_in_run(values: dict, job_dir: Path, on_start=None) -> dict:
    """What a finished `deltatune train` leaves: summary.json in its output dir. full never
    learns (the majority class); lora learns, better with more rows, a larger lr, a later seed."""
    out = Path(values["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    from deltatune.methods import config_from_dict, default_lr_for

    method, seed = values["method"]["name"], values["train"]["seed"]
    lr = values["train"]["lr"] or default_lr_for(config_from_dict(values["method"]))  # as the trainer does
    available = len(Path(values["data"]["train"]).read_text().splitlines())
    rows = min(available, values["data"].get("max_train_rows") or available)
    if values["task"] == "causal-lm":  # perplexity: lower with more rows, a larger lr, a later seed
        ppl = 30.0 - 4 * rows / 24 - seed + math.log10(lr)
        final = {"loss": math.log(ppl), "perplexity": ppl, "examples": 8}
        metric, learned = "perplexity", True
    else:
        metric, learned = "accuracy", method != "full"
        score = (0.5 if not learned else 0.6 + 0.1 * rows / 48 + 0.02 * seed + 0.01 * math.log10(lr / 1e-5))
        final = {"loss": 0.2 - 0.1 * math.log10(lr) * (1 if learned else 0) + (0 if learned else 0.5),
                 "accuracy": score, "majority_share": 0.5, "examples": 16}
    trainable = 20_000 if method == "full" else 1_000
    summary = {
        "model": values["model"], "task": values["task"], "method": values["method"], "output_dir": str(out),
        "trainable_params": trainable, "total_params": 20_000, "trainable_percent": 100 * trainable / 20_000,
        "lr": lr, "steps": rows // 8, "train_examples": rows, "eval_examples": 16,
        "time_per_step_s": 0.05 + 0.01 * seed + (0.02 if method == "full" else 0.0),
        "tokens_per_s": 900.0, "wall_time_s": 2.0 + seed,
        "final_eval": final, "metric": metric, "learned": learned,
        "did_not_learn": None if learned else {"reason": "every prediction is the majority class"},
        "saved_size_bytes": (80_000 if method == "full" else 4_000),
        "peak_memory_bytes": (300 + 10 * seed + (50 if method == "full" else 0)) * MB,
        "peak_memory_kind": "cpu_peak_rss"}
    (out / "summary.json").write_text(json.dumps(summary))
    return summary


def stand_in_forgetting(config, settings: dict, runs: dict[str, dict]) -> dict[str, dict]:
    """runner.forgetting's answer without a model: general-text perplexity rising with the lr."""
    found = {"base": {"perplexity": 40.0}}
    for name, summary in runs.items():
        delta = 2.0 + math.log10(summary["lr"]) / 10 + 0.05 * len(name)
        found[name] = {"perplexity": 40.0 + delta, "delta": delta}
    return found


@pytest.fixture(scope="module")
def finished(tmp_path_factory, request):
    """A finished comparison: 2 methods x (2 search trials + 2 seeds x 2 data sizes)."""
    root = tmp_path_factory.mktemp("reference")
    model = tiny_bert_dir(root)
    write_jsonl(root / "train.jsonl", sentiment_rows(96, seed=1))
    write_jsonl(root / "dev.jsonl", sentiment_rows(16, seed=2))
    config = write_config(root / "compare-tiny-reference.yaml", {
        "model": str(model), "task": "classification",
        "data": {"train": str(root / "train.jsonl"), "eval": str(root / "dev.jsonl"), "max_length": 32,
                 "max_train_rows": 48},
        "train": {"epochs": 1, "batch_size": 8, "bf16": False},
        "output_dir": str(root / "cmp"),
        "compare": {"methods": ["full", "lora"],
                    "search": {"trials": 2, "space": {"lr": "auto"}, "steps": 4, "rows": 32, "heldout_rows": 16,
                               "pruner": "none"},
                    "seeds": [0, 1], "data_sizes": [24]}})
    patch = pytest.MonkeyPatch()
    patch.setattr(runner, "run_method", stand_in_run)
    try:
        runner.compare_from_config(str(config), [])
    finally:
        patch.undo()
    return root, config, root / "cmp"


def test_record_holds_the_comparisons_own_rows_curves_search_and_budget(finished, tmp_path):
    from deltatune.compare import fair
    from deltatune.compare.search import read_search
    from deltatune.compare.study import open_storage, storage_url, study_prefix

    root, config, out = finished
    path = recorder.record(out, config, "tiny-reference", contended=True, docs=tmp_path / "docs",
                           result=tmp_path / "2026-12-08-reference-tiny-intel-amx.json")
    data = json.loads(path.read_text())
    assert data["rows"] == json.loads((out / "results.json").read_text())
    assert data["curves"] == json.loads((out / "curves.json").read_text())
    assert data["config_text"] == config.read_text() and data["command"] == f"deltatune compare {config}"
    assert data["precision"] == "bf16 autocast" and data["contended"] is True
    captions = [line for line in report.reference_comparison([path]) if line.startswith("*Measured")]
    assert len(captions) == 2 and all(report.CAPTION.match(c) for c in captions)
    assert all(c.endswith("wall and step times contended (run beside other jobs)*") for c in captions)
    b = data["budget"]
    assert (b["rows"], b["epochs"], b["batch"], b["seeds"], b["data_sizes"]) == (48, 1, 8, [0, 1], [24])
    assert b["search"] == {"trials": 2, "steps": 4, "rows": 32, "heldout_rows": 16, "pruner": "none"}
    # the search summary agrees with the studies themselves (study.db, read through optuna)
    search = read_search({"trials": 2, "space": {"lr": "auto"}, "steps": 4, "rows": 32, "heldout_rows": 16,
                          "pruner": "none"}, ["full", "lora"])
    storage = open_storage(storage_url(None, out))
    studies = fair.collect(storage, {m: f"{study_prefix(out)}/search/{m}" for m in ("full", "lora")},
                           search, "accuracy")
    for method, result in studies.items():
        s = data["search"][method]
        statuses = [c["status"] for c in result["candidates"]]
        assert (s["trials"], s["complete"], s["pruned"], s["failed"]) == (
            len(statuses), statuses.count("ok"), statuses.count("pruned"),
            len(statuses) - statuses.count("ok") - statuses.count("pruned"))
        assert s["chosen"] == (result["chosen"] or {}).get("params")
        assert s["indistinct"] == result["indistinct"]
    assert data["search"]["full"]["indistinct"] and data["search"]["full"]["chosen"] is None
    assert data["search"]["lora"]["chosen"]["lr"] > 0 and data["search"]["lora"]["complete"] == 2


def test_rendered_tables_have_every_method_with_mean_and_std_under_captions(finished, tmp_path):
    _, config, out = finished
    path = recorder.record(out, config, "tiny-reference", docs=tmp_path / "docs",
                           result=tmp_path / "2026-12-08-reference-tiny-intel-amx.json")
    lines = report.reference_comparison([path])
    tables = [i for i, line in enumerate(lines) if line.startswith("|") and not lines[i - 1].startswith("|")]
    assert len(tables) == 2  # the methods, then the learning curve
    for i in tables:
        above = [x for x in lines[:i] if x.strip()][-1]
        assert report.CAPTION.match(above), above
        assert "2026-12-08" in above and f"deltatune compare {config}" in above
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    body = [line for line in lines[tables[0] + 2:] if line.startswith("|")][:2]
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in body}
    assert set(cells) == {"full", "lora"}
    for method, row in rows.items():
        assert cells[method][1].startswith(f"{100 * row['score']:.2f} ± {100 * row['score_std']:.2f}%")
    assert "(did not learn)" in cells["full"][1] and "(did not learn)" not in cells["lora"][1]
    assert cells["full"][2] == "no" and cells["lora"][2] == "yes"
    assert cells["full"][3].startswith("defaults: trials could not be told apart")
    chosen = rows["lora"]["chosen_params"]
    assert set(chosen) == {"lr", "r", "alpha"}  # LoRA's own space beside the lr
    assert cells["lora"][3] == ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in chosen.items())
    curve = [line for line in lines[tables[1]:] if line.startswith("|")]
    assert curve[0] == "| method | 24 rows | 48 rows |" and len(curve) == 4
    assert "wall and step times contended" not in "\n".join(lines)  # not passed here


def test_copied_report_links_images_that_exist_and_names_no_local_path(finished, tmp_path):
    _, config, out = finished
    # the config as committed names its own output_dir; the comparison ran into another one
    committed = tmp_path / "compare-tiny-reference.yaml"
    committed.write_text(config.read_text().replace(f"output_dir: {out}", "output_dir: runs/tiny-reference"))
    assert "runs/tiny-reference" in committed.read_text()
    docs = tmp_path / "docs"
    recorder.record(out, committed, "tiny-reference", contended=True, docs=docs,
                    result=tmp_path / "2026-12-08-reference-tiny-intel-amx.json")
    page = docs / "reports" / "compare-tiny-reference.md"
    text = page.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == ["../images/compare-tiny-reference-curves.png",
                             "../images/compare-tiny-reference-search.png",
                             "../images/compare-tiny-reference-tradeoffs.png"]
    for link in links:
        copied = (page.parent / link).resolve()
        assert copied.read_bytes() == (out / link.rsplit("-", 1)[1]).read_bytes()
    source = (out / "report.md").read_text().splitlines()
    title, blank, intro = text.splitlines()[:3]
    assert (title, blank) == (source[0], "")
    assert intro.startswith(f"Made by `deltatune compare {committed}` on ") and recorder.CONTENDED in intro
    assert "Budget: search: 2 Optuna trials per method" in intro and "seeds 0, 1" in intro
    assert str(out) not in text and "sqlite:///runs/tiny-reference/study.db" in text
    # the rest is the comparison's report: only the image links and the study's path differ
    restored = [line.replace("../images/compare-tiny-reference-", "").replace("runs/tiny-reference", str(out))
                for line in text.splitlines()[3:]]
    assert restored == source[1:]


def test_recording_the_same_comparison_again_replaces_its_result(finished, tmp_path, monkeypatch):
    _, config, out = finished
    monkeypatch.setattr(recorder.machine, "RESULTS", tmp_path / "results")
    first = recorder.record(out, config, "tiny-reference", docs=tmp_path / "docs")
    again = recorder.record(out, config, "tiny-reference", contended=True, docs=tmp_path / "docs")
    assert again == first and first.parent == tmp_path / "results" / "quality"
    assert json.loads(first.read_text())["contended"] is True
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp file left either
    assert first.name.startswith(json.loads(first.read_text())["date"] + "-tiny-reference-")


def test_bad_inputs_are_one_line(finished, tmp_path, capsys):
    root, config, out = finished
    other = tmp_path / "other.yaml"
    other.write_text(config.read_text().replace("seeds:\n  - 0\n  - 1", "seeds:\n  - 0"))
    assert other.read_text() != config.read_text()
    with pytest.raises(recorder.RecordError, match="compare: section differs"):
        recorder.record(out, other, "x", docs=tmp_path / "docs", result=tmp_path / "r.json")
    assert recorder.main(["--from", str(tmp_path), "--config", str(config), "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results.json: not found" in err
    assert not (tmp_path / "docs").exists() and not (tmp_path / "r.json").exists()


def test_a_causal_lm_comparison_renders_perplexity_and_forgetting(tmp_path):
    from tiny_runs import alpaca_rows, tiny_llama_dir

    write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(48, seed=1))
    config = write_config(tmp_path / "compare-lm.yaml", {
        "model": str(tiny_llama_dir(tmp_path)), "task": "causal-lm",
        "data": {"train": str(tmp_path / "alpaca.jsonl"), "eval": str(tmp_path / "alpaca.jsonl"),
                 "format": "alpaca", "max_length": 64, "max_train_rows": 24},
        "train": {"epochs": 1, "batch_size": 4, "bf16": False}, "output_dir": str(tmp_path / "cmp"),
        "compare": {"methods": ["lora", "ia3"],
                    "search": {"trials": 2, "space": {"lr": "auto"}, "steps": 2, "rows": 8, "heldout_rows": 16,
                               "pruner": "none"},
                    "seeds": [0, 1], "data_sizes": [12]}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "run_method", stand_in_run)
        patch.setattr(runner, "forgetting", stand_in_forgetting)
        runner.compare_from_config(str(config), [])
    out = tmp_path / "cmp"
    path = recorder.record(out, config, "lm", docs=tmp_path / "docs",
                           result=tmp_path / "2026-12-08-reference-lm-intel-amx.json")
    lines = report.reference_comparison([path])
    head = next(line for line in lines if line.startswith("| method | perplexity"))
    assert head.endswith("| forgetting (Δ ppl) |") and "mean ± std over 2 seeds" in head
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    for method, row in rows.items():
        cells = next(line for line in lines if line.startswith(f"| {method} |")).split(" | ")
        assert cells[1] == f"{row['score']:.3f} ± {row['score_std']:.3f}"
        assert cells[-1] == f"{row['forgetting']:+.3f} ± {row['forgetting_std']:.3f} |"


def test_budget_line_says_when_the_curve_ran_over_fewer_seeds():
    b = {"rows": 8000, "epochs": 1, "batch": 32, "max_length": 64, "seeds": [0, 1, 2],
         "data_sizes": [500, 4000], "search": None}
    assert recorder.budget_line(b).endswith("learning curve at 500, 4,000, 8,000 rows")
    assert recorder.budget_line({**b, "curve_seeds": [0, 1, 2]}) == recorder.budget_line(b)
    assert recorder.budget_line({**b, "curve_seeds": [0]}).endswith(
        "learning curve at 500, 4,000, 8,000 rows (the smaller sizes over seed 0)")
