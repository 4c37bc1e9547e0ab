"""A generation comparison (causal LM, exact_match) judges "did not learn" against the untrained
base model's own score on the same eval rows (compare/base_score.py), scored once and reused."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tiny_runs import sentiment_rows, tiny_llama_dir, write_config, write_jsonl

from deltatune.cli import main
from deltatune.compare import base_score


def generation_config(root: Path, model: Path, lora_train: dict) -> Path:
    """Sentiment rows taught as answers ("no"/"yes"); full fine-tuning learns them in 24 steps,
    lora gets `lora_train` (a couple of small steps: its loss drops below a uniform guess, so the
    trainer's own check calls it learned, yet it answers no row)."""
    write_jsonl(root / "train.jsonl", sentiment_rows(64, seed=1))
    write_jsonl(root / "dev.jsonl", sentiment_rows(16, seed=2))
    return write_config(root / "compare.yaml", {
        "model": str(model), "task": "causal-lm",
        "data": {"train": str(root / "train.jsonl"), "eval": str(root / "dev.jsonl"), "format": "verbalized",
                 "prompt_template": "{text}", "label_names": ["no", "yes"], "max_length": 64},
        "method": {"name": "lora"},
        "train": {"epochs": 3, "batch_size": 8, "lr": 1e-2, "bf16": False, "metric": "exact_match"},
        "output_dir": str(root / "cmp"),
        "compare": {"methods": ["full", "lora"], "forgetting_max_rows": 8, "forgetting_max_length": 64, "workers": 2,
                    "per_method": {"lora": {"train": lora_train}}}})


def test_a_run_not_above_the_untrained_base_did_not_learn_and_the_base_is_scored_once(
        tmp_path, monkeypatch, capsys):
    scored = []
    evaluate = base_score.evaluate_base

    def counted(config, settings):
        scored.append(config.data.eval)
        return evaluate(config, settings)

    monkeypatch.setattr(base_score, "evaluate_base", counted)
    config = generation_config(tmp_path, tiny_llama_dir(tmp_path / "model"), {"max_steps": 2, "lr": 3e-3})
    assert main(["compare", str(config)]) == 0
    out = tmp_path / "cmp"
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    base = json.loads((out / "base" / "score.json").read_text())
    assert base["metric"] == "exact_match" and base["examples"] == 16
    assert base["margin"] == pytest.approx(max(math.sqrt(base["score"] * (1 - base["score"]) / 16), 1 / 16))
    full, lora = rows["full"], rows["lora"]
    # the trainer alone would have let lora pass: its loss is below a uniform guess over the vocabulary
    lora_summary = json.loads((out / "runs" / "lora" / "summary.json").read_text())
    assert lora_summary["learned"] is True and lora_summary["final_eval"]["loss"] < math.log(259) * 0.99
    assert lora["score"] <= base["score"] + base["margin"]
    assert lora["learned"] is False and "untrained base" in lora["not_learned_why"]
    assert full["score"] > base["score"] + base["margin"] and full["learned"] is True
    for row in (full, lora):
        assert row["no_skill"] == row["base_score"] == base["score"] and row["no_skill_kind"] == "untrained base"
    report = (out / "report.md").read_text()
    assert f"Untrained base: exact_match {base['score']:.2%} on 16 eval rows" in report
    assert "**lora did not learn**" in report and "0.00% (did not learn)" in report
    assert "level with" not in report and "did not learn: lora" in report
    assert "Best task score: **full**" in report
    assert scored == [str(tmp_path / "dev.jsonl")]
    # the web page's rows before results.json is written judge the runs against the base as well
    from deltatune.ui.runs import comparison_detail

    (out / "results.json").rename(out / "results.kept")
    live = {r["method"]: r for r in comparison_detail(tmp_path, "cmp")["rows"]}
    assert live["lora"]["learned"] is False and live["full"]["learned"] is True
    assert live["lora"]["no_skill_kind"] == "untrained base"
    (out / "results.kept").rename(out / "results.json")
    # again: the final runs and the base score are reused, nothing is scored twice
    capsys.readouterr()
    assert main(["compare", str(config)]) == 0
    printed = capsys.readouterr().out
    assert scored == [str(tmp_path / "dev.jsonl")] and "base model: exact_match" in printed and "(reused" in printed
    # another eval file is another no-skill level: scored again
    write_jsonl(tmp_path / "dev.jsonl", sentiment_rows(16, seed=3))
    assert main(["compare", str(config), "--overwrite"]) == 0
    assert len(scored) == 2


def test_margin_is_one_standard_error_and_never_under_one_row():
    assert base_score.margin(0.0, 16) == 1 / 16
    assert base_score.margin(0.5, 100) == pytest.approx(0.05)
    assert base_score.margin(0.5, 10_000) == pytest.approx(0.005)


def test_judge_keeps_the_trainers_verdict_and_marks_runs_at_the_base():
    base = {"score": 0.30, "metric": "exact_match", "examples": 100, "margin": base_score.margin(0.30, 100),
            "kind": "untrained base"}
    run = {"metric": "exact_match", "final_eval": {"exact_match": 0.33}, "learned": True, "did_not_learn": None}
    at_base = base_score.judge(run, base)  # 0.33 is within one standard error (0.046) of 0.30
    assert at_base["learned"] is False and "not above the untrained base's 30.00%" in at_base["did_not_learn"]["reason"]
    above = base_score.judge({**run, "final_eval": {"exact_match": 0.40}}, base)
    assert above["learned"] is True and above["did_not_learn"] is None and above["base_score"]["score"] == 0.30
    collapsed = {**run, "final_eval": {"exact_match": 0.9}, "learned": False, "did_not_learn": {"reason": "loss"}}
    assert base_score.judge(collapsed, base)["did_not_learn"] == {"reason": "loss"}
    assert base_score.judge({"error": "boom"}, base) == {"error": "boom"}


def test_a_search_trial_at_the_base_did_not_learn():
    base = {"score": 0.25, "metric": "exact_match", "examples": 64, "margin": base_score.margin(0.25, 64)}
    trial = {"status": "ok", "score": 0.27, "metric": "exact_match", "loss": 1.2, "learned": True}
    at_base = base_score.judge_trial(trial, base)
    assert at_base["learned"] is False and "untrained base's 25.00% on 64 held-out rows" in at_base["why_not_learned"]
    assert base_score.judge_trial({**trial, "score": 0.5}, base)["learned"] is True
    assert base_score.judge_trial({"status": "diverged", "why": "nan"}, base) == {"status": "diverged", "why": "nan"}
    collapsed = {**trial, "learned": False, "why_not_learned": "loss"}
    assert base_score.judge_trial(collapsed, base) == collapsed


def test_a_generation_search_whose_trials_stay_at_the_base_says_so_and_trains_the_defaults(tmp_path, capsys):
    """Two trials of a few tiny steps answer no held-out row better than the untouched model: the
    trainer's own check (loss under a uniform guess) passes them, the base on the held-out rows
    does not, so the search cannot tell them apart and the final run keeps the defaults."""
    config = generation_config(tmp_path, tiny_llama_dir(tmp_path / "model"), {})
    overrides = ["compare.methods=[lora]", "compare.per_method={}",
                 "compare.search={trials: 2, space: {lr: [1e-6, 3e-6, log]}, steps: 2, rows: 32, "
                 "heldout_rows: 16, pruner: none}", "train.max_steps=2"]
    assert main(["compare", str(config), *overrides]) == 0
    out = tmp_path / "cmp"
    base = json.loads((out / "search" / "base-score.json").read_text())
    assert base["examples"] == 16 and base["key"]["data"]["eval"].endswith("heldout.jsonl")
    printed = capsys.readouterr().out
    assert printed.count("base model: scoring the untrained base on the search's held-out rows") == 1
    report = (out / "report.md").read_text()
    assert "no trial learned anything" in report and "untrained base" in report


def test_only_exact_match_causal_lm_comparisons_score_the_base(tmp_path):
    from deltatune.config.run import load_run_config

    config = generation_config(tmp_path, tmp_path / "model", {})
    assert base_score.applies(load_run_config(str(config), [], comparison=True))
    assert not base_score.applies(load_run_config(str(config), ["train.metric=perplexity"], comparison=True))


def test_tradeoffs_png_draws_the_no_skill_line_at_the_base_score(tmp_path, monkeypatch):
    import matplotlib.axes

    from deltatune.compare.report import plot

    lines = []
    axhline = matplotlib.axes.Axes.axhline

    def recorded(self, y=0, **kw):
        lines.append((y, kw.get("label")))
        return axhline(self, y, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", recorded)
    row = {"metric": "exact_match", "score": 0.4, "learned": True, "trainable_params": 10, "peak_memory_mb": 5.0,
           "no_skill": 0.125, "no_skill_kind": "untrained base"}
    plot([{**row, "method": "full"}, {**row, "method": "lora", "score": 0.1, "learned": False}],
         tmp_path / "t.png", "tiny")
    assert lines == [(12.5, "no skill: untrained base 12.5%")]
