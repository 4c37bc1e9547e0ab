"""The comparison's search as Optuna studies in a database: seeded trials, pruning, several
workers on one SQLite study, a killed worker's trial retried, and the settings' one-line errors.

Most tests replace each training child by tests/study_driver.py's stand-in (seconds, not
minutes); the first trains the tiny model for real."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from study_driver import install, score_of
from tiny_runs import sentiment_rows, tiny_bert_dir, write_config, write_jsonl

from deltatune.cli import main
from deltatune.compare.report import place_labels
from deltatune.compare.search import indistinct, read_search, search_rows
from deltatune.errors import DeltatuneError

DRIVER = Path(__file__).with_name("study_driver.py")


def config_for(root: Path, model: str, search: dict, methods=("full", "lora"), rows: int = 96, **compare) -> Path:
    write_jsonl(root / "train.jsonl", sentiment_rows(rows, seed=1))
    write_jsonl(root / "dev.jsonl", sentiment_rows(32, seed=2))
    return write_config(root / "compare.yaml", {
        "model": model, "task": "classification",
        "data": {"train": str(root / "train.jsonl"), "eval": str(root / "dev.jsonl"), "max_length": 32},
        "method": {"name": "lora"},
        "train": {"epochs": 1, "batch_size": 8, "bf16": False},
        "output_dir": str(root / "cmp"), "compare": {"methods": list(methods), "search": search, **compare}})


def trials_of(out: Path, row: str) -> list:
    storage = f"sqlite:///{out / 'study.db'}"
    return optuna.load_study(study_name=f"deltatune:{out.name}/search/{row}", storage=storage).get_trials()


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_HEARTBEAT_S", "1")
    import deltatune.compare.plan as plan
    import deltatune.compare.runner as runner

    monkeypatch.setattr(runner, "run_method", runner.run_method)
    monkeypatch.setattr(plan, "plan_methods", plan.plan_methods)
    install(tmp_path)
    return tmp_path


def test_two_method_study_on_the_tiny_model_reports_trials_and_reads_them_back(tmp_path):
    """Real training: 3 trials each; the report shows the trials, the best settings and search.png."""
    model = tiny_bert_dir(tmp_path / "model")
    config = config_for(tmp_path, str(model), {"trials": 3, "steps": 8, "rows": 48, "heldout_rows": 32,
                                               "per_method": {"full": {"lr": [1e-3, 1e-2, "log"]},
                                                              "lora": {"r": [2, 4], "alpha": 8}}},
                        workers=2)
    assert main(["compare", str(config)]) == 0
    out = tmp_path / "cmp"
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())}
    for name in ("full", "lora"):
        trials = trials_of(out, name)
        assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        # each trial's value is its own run's held-out accuracy, on the held-out slice
        for trial in trials:
            summary = json.loads((out / "runs" / f"search-{name}-t{trial.number}" / "summary.json").read_text())
            assert trial.value == summary["final_eval"]["accuracy"] and summary["eval_examples"] == 32
            assert trial.user_attrs["loss"] == summary["final_eval"]["loss"]
        assert [c["number"] for c in rows[name]["search"]] == [0, 1, 2]
    assert {t.params["r"] for t in trials_of(out, "lora")} <= {2, 4}
    import yaml

    for trial in trials_of(out, "lora"):  # a single value is fixed, not searched
        assert "alpha" not in trial.params
        child = yaml.safe_load((out / "jobs" / f"search-lora-t{trial.number}" / "configs" /
                                f"search-lora-t{trial.number}.yaml").read_text())
        assert child["method"]["alpha"] == 8 and child["method"]["r"] == trial.params["r"]
    assert all(1e-3 <= t.params["lr"] <= 1e-2 for t in trials_of(out, "full"))
    for name in ("full", "lora"):  # planned at the configuration the final run trained with
        assert rows[name]["planned_trainable_params"] == rows[name]["trainable_params"]
    report = (out / "report.md").read_text()
    assert "## Search" in report and "## Search trials" in report and (out / "search.png").stat().st_size > 10_000
    assert "optuna-dashboard sqlite:///" in report


def test_same_config_same_trials(fake):
    """Seeded TPE: two studies from the same config sample the same parameters, trial by trial."""
    params = []
    for run in ("a", "b"):
        root = fake / run
        root.mkdir()
        config = config_for(root, "tiny", {"trials": 5, "steps": 4, "rows": 48, "heldout_rows": 32,
                                           "pruner": "none"})
        assert main(["compare", str(config)]) == 0
        params.append({row: [t.params for t in trials_of(root / "cmp", row)] for row in ("full", "lora")})
    assert params[0] == params[1]
    assert len({json.dumps(p, sort_keys=True) for p in params[0]["lora"]}) == 5  # not one point repeated
    # and another seed samples other points
    root = fake / "c"
    root.mkdir()
    config = config_for(root, "tiny", {"trials": 5, "steps": 4, "rows": 48, "heldout_rows": 32, "pruner": "none"})
    assert main(["compare", str(config), "train.seed=7"]) == 0
    assert [t.params for t in trials_of(root / "cmp", "lora")] != params[0]["lora"]


def test_a_lagging_trial_is_pruned_and_shown_as_pruned(fake, capsys):
    # grid: the good lr first, then one far off; the median pruner stops the second at its first report
    config = config_for(fake, "tiny", {"lr": [1e-3, 1e-7], "steps": 8, "rows": 48, "heldout_rows": 32,
                                       "pruner": "median"},
                        methods=("lora",))
    assert main(["compare", str(config)]) == 0
    out = fake / "cmp"
    good, bad = trials_of(out, "lora")
    assert good.state == optuna.trial.TrialState.COMPLETE and good.params == {"lr": 1e-3}
    assert bad.state == optuna.trial.TrialState.PRUNED and bad.params == {"lr": 1e-7}
    assert max(bad.intermediate_values) < 8  # stopped before its last step
    log = (fake / "executions.log").read_text()
    assert "start search-lora-t1" in log and "finish search-lora-t1" not in log
    [row] = json.loads((out / "results.json").read_text())
    assert row["chosen_lr"] == 1e-3
    assert "pruned at step" in (out / "report.md").read_text()


def _study_done(out: Path, rows) -> bool:
    try:
        return all(sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials_of(out, r)) == 3 for r in rows)
    except (KeyError, Exception):
        return False


def _driver(root: Path, config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "DELTATUNE_HEARTBEAT_S": "1", "STUDY_DRIVER_STEP_S": "0.25", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(DRIVER), str(root), "compare", str(config), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def test_two_worker_processes_run_every_trial_exactly_once(tmp_path):
    config = config_for(tmp_path, "tiny", {"trials": 3, "steps": 8, "rows": 48, "heldout_rows": 32,
                                           "pruner": "none"}, seeds=[0, 1])
    first = _driver(tmp_path, config)
    second = _driver(tmp_path, config, "--join")  # at once: both may create the database's tables
    out_first, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out_first[-2000:]
    out_second, _ = second.communicate(timeout=300)
    assert first.returncode == 0, out_first[-2000:]
    assert second.returncode == 0, out_second[-2000:]
    log = [line.split() for line in (tmp_path / "executions.log").read_text().splitlines()]
    started = Counter(job for kind, job, _ in log if kind == "start")
    finished = Counter(job for kind, job, _ in log if kind == "finish")
    searched = {f"search-{r}-t{n}" for r in ("full", "lora") for n in range(3)}
    finals = {f"{r}-s{s}" for r in ("full", "lora") for s in (0, 1)}
    assert set(started) == set(finished) == searched | finals
    assert set(started.values()) == {1} and set(finished.values()) == {1}  # nobody ran a trial twice
    assert len({pid for _, _, pid in log}) == 2  # both workers took work
    assert "--join: ran" in out_second
    out = tmp_path / "cmp"
    assert _study_done(out, ("full", "lora"))
    assert (out / "report.md").exists()


def test_a_worker_with_another_output_dir_path_shares_the_study(tmp_path):
    """One storage, two output directories at different paths (another machine's mount): the join
    worker finds the same studies, both run trials, and the coordinator resolves the worker's runs
    against its own output directory."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    config = config_for(tmp_path, "tiny", {"trials": 3, "steps": 8, "rows": 48, "heldout_rows": 32,
                                           "pruner": "none", "storage": storage}, seeds=[0, 1])
    here, there = tmp_path / "here" / "cmp", tmp_path / "there" / "cmp"
    first = _driver(tmp_path, config, f"output_dir={here}")
    second = _driver(tmp_path, config, f"output_dir={there}", "--join")
    out_first, _ = first.communicate(timeout=300)
    out_second, _ = second.communicate(timeout=300)
    assert first.returncode == 0, out_first[-2000:]
    assert second.returncode == 0, out_second[-2000:]
    log = [line.split() for line in (tmp_path / "executions.log").read_text().splitlines()]
    started = Counter(job for kind, job, _ in log if kind == "start")
    assert set(started.values()) == {1} and len(started) == 6 + 4  # every trial and final run once
    assert len({pid for _, _, pid in log}) == 2  # both workers took work
    final = optuna.load_study(study_name="deltatune:cmp/final", storage=storage)
    dirs = {t.user_attrs["job"]: t.user_attrs["summary"]["output_dir"] for t in final.get_trials()}
    assert dirs == {job: f"{{output_dir}}/runs/{job}" for job in ("full-s0", "full-s1", "lora-s0", "lora-s1")}
    assert str(there) not in json.dumps([t.user_attrs for t in final.get_trials()])
    rows = json.loads((here / "results.json").read_text())
    assert [r["seeds"] for r in rows] == [2, 2] and (here / "report.md").exists()


def test_a_killed_worker_trial_is_retried_never_lost_or_doubled(tmp_path):
    config = config_for(tmp_path, "tiny", {"trials": 3, "steps": 12, "rows": 48, "heldout_rows": 32,
                                           "pruner": "none"}, methods=("lora",))
    worker = _driver(tmp_path, config)
    log_path = tmp_path / "executions.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log_path.exists() and "start search-lora-t1" in log_path.read_text()):
        time.sleep(0.2)
    time.sleep(0.5)  # mid-trial
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    assert "finish search-lora-t1" not in log_path.read_text()
    again = _driver(tmp_path, config)
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0, output[-2000:]
    trials = trials_of(tmp_path / "cmp", "lora")
    states = Counter(t.state for t in trials)
    assert states[optuna.trial.TrialState.COMPLETE] == 3 and states[optuna.trial.TrialState.FAIL] == 1
    [lost] = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == lost.number]
    assert lost.number == 1 and retry.state == optuna.trial.TrialState.COMPLETE and retry.params == lost.params
    finished = Counter(line.split()[1] for line in log_path.read_text().splitlines() if line.startswith("finish"))
    assert set(finished.values()) == {1}
    assert {f"search-lora-t{t.number}" for t in trials if t.state == optuna.trial.TrialState.COMPLETE} \
        <= set(finished)
    [row] = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert [c["status"] for c in row["search"]].count("lost") == 1


@pytest.mark.parametrize("search, expected", [
    ({"space": {"rank": [4, 8]}}, "compare.search.space.rank: no method in this comparison has a parameter"),
    ({"per_method": {"lora": {"rank": [4, 8]}}}, "compare.search.per_method.lora.rank: lora has no parameter 'rank'"),
    ({"per_method": {"lora": {"r": [0, 8]}}}, "compare.search.per_method.lora.r: 0 is not a value lora can take"),
    ({"per_method": {"lora": {"r": [0, 16, "linear"]}}}, "compare.search.per_method.lora.r: 0 is not a value"),
    ({"space": {"lr": [1e-3, 1e-4, "log"]}}, "compare.search.space.lr: a range is [low, high, log|linear] with low < high"),
    ({"storage": "not a url"}, "compare.search.storage: expected an SQLAlchemy URL"),
    ({"storage": "sqlite:////nonexistent-dir/deeper/study.db"}, "compare.search.storage: cannot open"),
    ({"storage": "nosuchdb://host/x"}, "compare.search.storage: cannot open"),
    ({"pruner": "sometimes"}, "compare.search.pruner: one of median, hyperband, none"),
    ({"trials": 0}, "compare.search.trials: must be a positive integer"),
])
def test_bad_search_settings_are_one_line_exit_2(tmp_path, capsys, search, expected):
    config = config_for(tmp_path, str(tmp_path / "no-model-needed"), search)
    assert main(["compare", str(config)]) == 2
    error = capsys.readouterr().err.strip()
    assert expected in error and "\n" not in error and "Traceback" not in error


def test_defaults_shrink_to_a_small_training_file_and_given_rows_do_not():
    search = read_search({}, ["lora"])
    assert search_rows(search, 256, "train.jsonl") == (171, 85)
    assert search_rows(search, 1000, "train.jsonl") == (400, 200)
    with pytest.raises(DeltatuneError, match="too few"):
        search_rows(search, 20, "train.jsonl")
    given = read_search({"rows": 300, "heldout_rows": 100}, ["lora"])
    with pytest.raises(DeltatuneError, match="rows \\+ heldout_rows = 400, but train.jsonl gives only 256"):
        search_rows(given, 256, "train.jsonl")


def test_trials_that_cannot_be_told_apart_are_said_so():
    same = [{"status": "ok", "score": 0.69, "loss": 0.681, "metric": "accuracy", "learned": True},
            {"status": "ok", "score": 0.69, "loss": 0.680, "metric": "accuracy", "learned": True}]
    assert "scored the same" in indistinct(same, 160)
    idle = [{**c, "learned": False, "why_not_learned": "majority class"} for c in same]
    idle[1]["score"] = 0.75
    assert "no trial learned" in indistinct(idle, 160)
    apart = [same[0], {**same[1], "loss": 0.60}]
    assert indistinct(apart, 160) is None


def test_tied_labels_never_overlap():
    anchors = [(100.0, 200.0)] * 4 + [(103.0, 202.0)]
    sizes = [(60.0, 24.0)] * 5
    boxes = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(place_labels(anchors, sizes), sizes)]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_fake_scores_peak_at_the_fake_optimum():
    # the stand-in's landscape the tests rely on: lr 1e-3 beats 1e-7
    assert score_of({"train": {"lr": 1e-3}, "method": {}}) > score_of({"train": {"lr": 1e-7}, "method": {}}) + 0.3


def test_plan_counts_trials_and_plans_the_heaviest_searched_configuration(tmp_path, capsys):
    model = tiny_bert_dir(tmp_path / "model")
    config = config_for(tmp_path, str(model), {"trials": 3, "per_method": {"lora": {"r": [2, 16]}}})
    assert main(["plan", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "search: 6 trials (full 3, lora 3)" in printed and "lora r=16" in printed
    heavy = next(line for line in printed.splitlines() if line.startswith("lora "))
    (tmp_path / "x").mkdir()
    explicit = config_for(tmp_path / "x", str(model), None, methods=("lora",))
    assert main(["plan", str(explicit), "method.r=16"]) == 0
    same = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("lora "))
    assert heavy.split()[1] == same.split()[1]  # the trainable parameters of r=16


def _row(method: str, score: float, learned: bool = True, **more) -> dict:
    return {"method": method, "metric": "accuracy", "score": score, "learned": learned,
            "not_learned_why": None if learned else "every eval row was predicted as one class",
            "trainable_params": 10, "trainable_percent": 1.0, "time_per_step_s": 0.1,
            "peak_memory_mb": 100.0, "saved_mb": 1.0, "no_skill": 0.684, **more}


def test_rows_that_did_not_learn_give_no_level_with_and_no_verdict():
    from deltatune.compare.report import format_table, reading
    from deltatune.compare.verdicts import verdicts

    # the shape of the sentence-pair report: full and most PEFT rows at the majority class, one above
    rows = [_row("full", 0.684, learned=False), _row("lora", 0.684, learned=False), _row("ia3", 0.728)]
    table = format_table(rows, markdown=True)
    assert "68.40% (did not learn)" in table and "72.80%" in table and "72.80% (did" not in table
    text = reading(rows, "classification")
    assert "**full did not learn**" in text and "**lora did not learn**" in text
    assert "level with" not in text and "Best task score: **ia3**" in text
    judged = verdicts(rows, None, "classification",
                      {"full": {"indistinct": "no trial learned anything"}, "lora": {"indistinct": None}})
    assert "does not hold here" not in judged and "full fine-tuning was not in this comparison" in judged
    assert "Left out of every verdict — did not learn: full, lora" in judged
    assert "could not tell the trials apart" in judged and "full (no trial learned anything)" in judged
    nobody = verdicts([_row("full", 0.684, learned=False)], None, "classification")
    assert nobody.startswith("No method learned; no verdict.")


def test_a_small_data_verdict_from_one_seed_says_it_has_no_spread():
    from deltatune.compare.verdicts import verdicts

    def spread(method, score, std):
        return _row(method, score, seeds=3, score_std=std)

    full_size = [spread("full", 0.86, 0.01), spread("lora", 0.85, 0.01)]
    one_seed = {500: [_row("full", 0.70), _row("lora", 0.75)], 8000: full_size}
    judged = verdicts(full_size, one_seed, "classification")
    assert "claim \"PEFT shines when data is small\": holds on one seed at 500 rows" in judged
    assert "no spread there to tell it from noise" in judged
    # with a spread at the small size, the same gap is judged against it, unqualified
    three_seeds = {500: [spread("full", 0.70, 0.01), spread("lora", 0.75, 0.01)], 8000: full_size}
    judged = verdicts(full_size, three_seeds, "classification")
    assert "small\": holds." in judged and "one seed" not in judged


def test_edge_of_range_only_when_the_edge_scored_best():
    from deltatune.compare.search_report import edge_remark

    def trial(number, lr, score, loss):
        return {"number": number, "params": {"lr": lr}, "status": "ok", "score": score, "loss": loss,
                "metric": "accuracy"}

    tied = [trial(0, 1e-4, 0.69, 0.66), trial(1, 1e-3, 0.69, 0.65), trial(2, 1e-2, 0.69, 0.68)]
    best_in_middle = {"chosen": tied[1], "candidates": tied}
    assert edge_remark("lora", best_in_middle, {}) is None
    edge = [trial(0, 1e-4, 0.60, 0.70), trial(1, 1e-3, 0.70, 0.60), trial(2, 1e-2, 0.80, 0.50)]
    remark = edge_remark("lora", {"chosen": edge[2], "candidates": edge}, {})
    assert "the best lr (0.01) is the highest tried" in remark
    # an edge tied on score with an inner point, and not better by loss: no remark
    level = [trial(0, 1e-4, 0.60, 0.70), trial(1, 1e-3, 0.80, 0.50), trial(2, 1e-2, 0.80, 0.55)]
    assert edge_remark("lora", {"chosen": level[2], "candidates": level}, {}) is None


def test_the_plan_column_plans_the_configuration_the_search_chose(tmp_path, monkeypatch):
    """Planned before the search at the defaults (r=8), then again at the chosen r: the table's
    plan MB and trainable count are the chosen configuration's."""
    import deltatune.compare.plan as plan
    import deltatune.compare.runner as runner
    from study_driver import fake_run_method

    monkeypatch.setenv("DELTATUNE_HEARTBEAT_S", "1")
    monkeypatch.setattr(runner, "run_method", fake_run_method(tmp_path))
    calls = []
    real = plan.plan_methods

    def recorded(config, methods, per_method=None, *args):
        plans = real(config, methods, per_method, *args)
        calls.append(({m: (per_method or {}).get(m) for m in methods}, {p.method: p for p in plans}))
        return plans

    monkeypatch.setattr(plan, "plan_methods", recorded)
    model = tiny_bert_dir(tmp_path / "model")
    config = config_for(tmp_path, str(model), {"trials": 4, "steps": 4, "rows": 48, "heldout_rows": 32,
                                               "pruner": "none", "per_method": {"lora": {"r": [2, 64]}}},
                        methods=("lora",))
    assert main(["compare", str(config)]) == 0
    [row] = json.loads((tmp_path / "cmp" / "results.json").read_text())
    chosen = row["chosen_params"]["r"]
    assert chosen in (2, 64)
    (defaults, before), (configured, after) = calls
    assert defaults == {"lora": None} and configured["lora"]["method"]["r"] == chosen
    assert row["planned_peak_mb"] == after["lora"].predicted_peak_bytes / 2**20
    assert row["planned_trainable_params"] == after["lora"].trainable_params
    # the delta's weights, gradients and optimizer state scale with r: 8 -> 2 shrinks them, 8 -> 64 grows them
    fixed = [p.weights_bytes + p.gradient_bytes + p.optimizer_bytes for p in (before["lora"], after["lora"])]
    assert (fixed[1] < fixed[0]) if chosen == 2 else (fixed[1] > fixed[0])
    assert after["lora"].trainable_params != before["lora"].trainable_params


def test_a_study_keyed_by_absolute_paths_is_continued_not_refused(fake):
    """A study made before its records were path-independent (its key held absolute paths) has
    the same settings: a rerun continues it, runs nothing again, and updates its key."""
    from deltatune.compare.jobs import local

    config = config_for(fake, "tiny", {"trials": 2, "steps": 4, "rows": 48, "heldout_rows": 32, "pruner": "none"},
                        methods=("lora",))
    assert main(["compare", str(config)]) == 0
    out = fake / "cmp"
    study = optuna.load_study(study_name="deltatune:cmp/search/lora", storage=f"sqlite:///{out / 'study.db'}")
    key = study.user_attrs["key"]
    assert key["config"]["data"]["train"] == "{output_dir}/search/fit.jsonl"
    study.set_user_attr("key", local(key, out))  # as the older version wrote it
    runs = (fake / "executions.log").read_text().count("start search-")
    assert main(["compare", str(config)]) == 0
    assert (fake / "executions.log").read_text().count("start search-") == runs
    assert optuna.load_study(study_name="deltatune:cmp/search/lora",
                             storage=f"sqlite:///{out / 'study.db'}").user_attrs["key"] == key


def test_a_fixed_value_reaches_the_final_runs(tmp_path, monkeypatch):
    """`per_method.lora.alpha: 4` is a setting, not a searched one: Optuna does not record it in
    the trial's params, yet the final runs train with it next to the chosen r."""
    import deltatune.compare.runner as runner
    from study_driver import fake_run_method

    monkeypatch.setenv("DELTATUNE_HEARTBEAT_S", "1")
    seen = []
    fake = fake_run_method(tmp_path)

    def recording(values, out_dir, on_start=None):
        seen.append((Path(values["output_dir"]).parent.name, dict(values["method"])))
        return fake(values, out_dir, on_start)

    monkeypatch.setattr(runner, "run_method", recording)
    model = tiny_bert_dir(tmp_path / "model")
    config = config_for(tmp_path, str(model), {"trials": 3, "steps": 4, "rows": 48, "heldout_rows": 32,
                                               "pruner": "none",
                                               "per_method": {"lora": {"r": [2, 4], "alpha": 4}}},
                        methods=("lora",))
    assert main(["compare", str(config)]) == 0
    finals = [method for parent, method in seen if parent == "runs"]
    assert finals and all(m["alpha"] == 4 and m["r"] in (2, 4) for m in finals)
    assert all(m["alpha"] == 4 for parent, m in seen if parent != "runs")  # the trials had it too
