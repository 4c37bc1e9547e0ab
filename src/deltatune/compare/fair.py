"""A fair comparison: each method at its own searched settings, over seeds and data sizes, then verdicts.

Stages (each a queue of `deltatune train` children in an Optuna study, compare/study.py):
1. search (compare.search): trials per method on a held-out slice of the training file;
2. final runs: every method x seed (x data size) at its best trial's settings (reused when
   finished earlier with the same settings);
3. for generation (causal LM, exact_match) the untrained base's score, the no-skill level every
   final run is judged against (compare/base_score.py); forgetting of every final run (causal
   LMs); the memory plan again at each method's chosen configuration; rows per seed -> mean ± std,
   curves, verdicts.
The study's records name paths inside the output directory relative to it (jobs.portable), so a
--join worker may keep the output directory at another path, on another machine.
`deltatune compare CONFIG --join` runs stages 1 and 2 only, beside the process that plans them.
The runner passes in its own run_method / forgetting / method_run_config, so this module depends
on none of the runner's internals (and there is no import circle).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from deltatune.compare import base_score
from deltatune.compare import study as studies
from deltatune.compare.jobs import Job, check_stale, expected_steps, local, portable, progress_for, run_job
from deltatune.compare.repeats import aggregate, curve_table, plot_curves, run_sizes, seeds_at
from deltatune.compare.report import _atomic_write, build_rows, write_outputs
from deltatune.compare.search import (LOWER_IS_BETTER, choose, indistinct, judge, split_training,
                                      trial_values, trials_for)
from deltatune.compare.search_report import search_sections
from deltatune.compare.study_keys import final_key, search_key
from deltatune.compare.space import describe, fixed_values, suggest
from deltatune.config.run import RunConfig
from deltatune.training.evaluation import default_metric


def _budget_line(config: RunConfig, settings: dict, search: dict | None, n_final: int) -> str:
    parts = []
    if search:
        steps = f"{search['steps']} steps" if search["steps"] else f"{config.train.epochs} epoch(s)"
        n_search = sum(trials_for(search, m) for m in settings["methods"])
        parts.append(f"search: {n_search} trials ({steps} each on {search['rows']} training rows, "
                     f"scored on {search['heldout_rows']} held-out training rows; pruner {search['pruner']})")
    sizes = run_sizes(settings, config.data.max_train_rows)[1:]
    shape = f"{len(settings['seeds'])} seed(s)"
    if sizes and seeds_at(settings, sizes[0]) != settings["seeds"]:
        shape += f" at the full size + {len(seeds_at(settings, sizes[0]))} seed(s) x {len(sizes)} smaller size(s)"
    elif sizes:
        shape += f" x {1 + len(sizes)} data size(s)"
    parts.append(f"final: {n_final} runs ({len(settings['methods'])} methods x {shape})")
    return "; ".join(parts) + f"; {settings['workers']} worker(s) here"


def _sampler(search: dict, row: str, seed: int, number: int):
    """Seeded per trial: the same config gives the same trials, whichever worker runs them."""
    import optuna

    startup = max(2, trials_for(search, row) // 3)  # random trials first, then TPE
    return optuna.samplers.TPESampler(seed=seed * 100_003 + number, n_startup_trials=startup)


def _pruner(search: dict, steps: int):
    import optuna

    if search["pruner"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(steps, 2))
    if search["pruner"] == "median":
        # never on the first held-out report: a quarter of the steps in, scores are still noise
        return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=steps // 4 + 1)
    return optuna.pruners.NopPruner()


class _HeldoutBase:
    """The untrained base's score on the search's held-out rows, with the trials' eval settings:
    scored once (the first trial to finish asks; the worker threads share it), then reused from
    OUT/search/base-score.json by every later process."""

    def __init__(self, trial: dict, out_dir: Path):
        import threading

        from deltatune.config.run import build_run_config

        self.config, self.out_dir = build_run_config(trial), out_dir
        self.lock, self.record = threading.Lock(), None

    def score(self) -> dict:
        with self.lock:
            if self.record is None:
                self.record = base_score.score_base(self.config, self.out_dir, base_score.SEARCH_FILE,
                                                    "search's held-out rows")
            return self.record


def _search_queues(config: RunConfig, settings: dict, out_dir: Path, join: bool, overwrite: bool,
                   storage, run_method: Callable, method_run_config: Callable) -> tuple[list, Callable]:
    """The search studies (created or continued; awaited with --join) and a worker for them."""
    import optuna

    search, seed = settings["search"], settings["seeds"][0]
    fit, heldout = split_training(config, search, out_dir)
    metric = config.train.metric or default_metric(config.task)
    direction = "minimize" if metric in LOWER_IS_BETTER else "maximize"
    contexts = {}
    heldout_base = None
    for row in settings["methods"]:
        values = method_run_config(config, settings, row, out_dir)
        values["train"]["seed"] = seed
        base = trial_values(values, {}, fit, heldout, search, out_dir / "runs" / "search")
        if heldout_base is None and base_score.applies(config):
            heldout_base = _HeldoutBase(base, out_dir)
        key = search_key(row, search, base, seed, out_dir)
        name = f"{studies.study_prefix(out_dir)}/search/{row}"
        if join:
            studies.wait_for(storage, name, key)
        else:
            entries = ([(params, {}) for params in search["grids"][row]] if row in search["grids"]
                       else [({}, {}) for _ in range(search["trials"])])
            # older versions keyed the study by absolute paths: the same settings, continued
            studies.prepare(storage, name, key, entries, direction, overwrite, older_key=local(key, out_dir))
        contexts[row] = (name, values, expected_steps(base, search["rows"]))

    def run_trial(row: str, study, trial_id: int) -> None:
        _, values, steps = contexts[row]
        number = study._storage.get_trial_number_from_id(trial_id)
        study.sampler = _sampler(search, row, seed, number)
        trial = optuna.trial.Trial(study, trial_id)
        space = search["grids"][row][0].keys() if row in search["grids"] else None
        params = ({k: trial.suggest_categorical(k, [g[k] for g in search["grids"][row]]) for k in space}
                  if space else suggest(trial, search["spaces"][row]))
        job_id = f"search-{row}-t{number}"
        run_dir = out_dir / "runs" / job_id
        candidate = trial_values(values, params, fit, heldout, search, run_dir)
        trial.set_user_attr("worker", studies.worker_name())
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        print(f"[search] {row} trial {number}: {shown}", flush=True)
        from deltatune.training.run_dir import partial_dir

        watch = studies.Watch(trial, partial_dir(run_dir) / "metrics.jsonl", metric)
        summary = run_method(candidate, out_dir / "jobs" / job_id, on_start=watch.start)
        if watch.pruned:
            trial.set_user_attr("status", "pruned")
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            print(f"[search] {row} trial {number}: pruned (held-out {metric} lagged)", flush=True)
            return
        verdict = judge(summary)
        if heldout_base is not None:  # generation: held to the untrained base on the same rows
            verdict = base_score.judge_trial(verdict, heldout_base.score())
        for key in ("status", "why", "loss", "learned", "why_not_learned"):
            if verdict.get(key) is not None:
                trial.set_user_attr(key, verdict[key])
        if verdict["status"] == "ok":
            study.tell(trial, verdict["score"])
            print(f"[search] {row} trial {number}: held-out {metric} {verdict['score']:.4f}, "
                  f"loss {verdict.get('loss') or float('nan'):.4f}", flush=True)
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            print(f"[search] {row} trial {number}: {verdict['status']}: {verdict.get('why', '')}", flush=True)

    def work() -> int:
        # each thread its own study objects (a sampler is set per trial)
        queues = []
        for row, (name, _, steps) in contexts.items():
            study = studies.load(storage, name, pruner=_pruner(search, steps))
            queues.append((study, lambda s, t, row=row: run_trial(row, s, t)))
        return studies.drain(queues)

    return [name for name, _, _ in contexts.values()], work


def collect(storage, names: dict[str, str], search: dict, metric: str) -> dict[str, dict]:
    """{row: {"candidates": [...], "chosen": {...} | None, "indistinct": why | None, "study": name}}."""
    from optuna.trial import TrialState

    result = {}
    for row, name in names.items():
        study = studies.load(storage, name)
        candidates = []
        for trial in study.get_trials(deepcopy=False):
            attrs = trial.user_attrs
            entry = {"number": trial.number, "params": dict(trial.params), "metric": metric,
                     "intermediate": dict(trial.intermediate_values), "worker": attrs.get("worker")}
            if trial.state == TrialState.COMPLETE:
                entry.update(status="ok", score=trial.value, loss=attrs.get("loss"), learned=attrs.get("learned"),
                             why_not_learned=attrs.get("why_not_learned"))
            elif trial.state == TrialState.PRUNED:
                last = max(trial.intermediate_values) if trial.intermediate_values else None
                entry.update(status="pruned", score=trial.intermediate_values.get(last) if last else None,
                             step=last)
            elif trial.state == TrialState.FAIL and "status" in attrs:
                entry.update(status=attrs["status"], why=attrs.get("why", ""))
            elif trial.state == TrialState.FAIL:
                entry.update(status="lost", why="its worker stopped (no heartbeat); run again as a new trial")
            else:
                continue
            candidates.append(entry)
        chosen = choose(candidates)
        why_same = indistinct(candidates, search["heldout_rows"])
        result[row] = {"candidates": candidates, "chosen": None if why_same else chosen,
                       "best": chosen, "indistinct": why_same, "study": name}
    return result


def final_jobs(config: RunConfig, settings: dict, out_dir: Path, params: dict[str, dict | None],
               method_run_config: Callable) -> dict[tuple, Job]:
    """{(method, seed, size or None): Job}; size None is the run's own training budget. `params`:
    each method's searched settings ({} for its defaults); a method missing from it failed."""
    from deltatune.compare.space import apply_params

    jobs = {}
    sizes = run_sizes(settings, config.data.max_train_rows)
    for name in settings["methods"]:
        if name not in params:
            continue
        for size in sizes:
            for seed in seeds_at(settings, size):
                job_id = name + (f"-s{seed}" if len(settings["seeds"]) > 1 else "") + (f"-n{size}" if size else "")
                values = apply_params(method_run_config(config, settings, name, out_dir), params[name] or {})
                values["output_dir"] = str(out_dir / "runs" / job_id)
                values["train"]["seed"] = seed
                if size:
                    values["data"]["max_train_rows"] = size
                rows = size or config.data.max_train_rows
                label = f"{name} seed {seed}" + (f" on {size} rows" if size else "")
                jobs[(name, seed, size)] = Job(job_id, values, expected_steps(values, rows), label)
    return jobs


def _final_queue(storage, out_dir: Path, jobs: dict[tuple, Job], settings: dict, join: bool,
                 overwrite: bool, run_method: Callable) -> tuple[str, Callable]:
    import optuna

    name = f"{studies.study_prefix(out_dir)}/final"
    by_id = {job.id: job for job in jobs.values()}
    key = final_key(jobs, out_dir)
    if join:
        studies.wait_for(storage, name, key)
    else:
        check_stale(list(jobs.values()), out_dir, overwrite)
        studies.prepare(storage, name, key, [({}, {"job": job.id}) for job in jobs.values()],
                        "maximize", overwrite, fresh=True)
    progress = progress_for(list(jobs.values()), out_dir, settings["workers"], "final")

    def run_trial(study, trial_id: int) -> None:
        trial = study._storage.get_trial(trial_id)
        summary = run_job(by_id[trial.user_attrs["job"]], out_dir, run_method, progress, "final")
        study._storage.set_trial_user_attr(trial_id, "worker", studies.worker_name())
        # paths inside the output dir relative to it: the coordinator resolves them against its own
        study._storage.set_trial_user_attr(trial_id, "summary",
                                           portable(json.loads(json.dumps(summary, default=str)), out_dir))
        score = (summary.get("final_eval") or {}).get(summary.get("metric") or "")
        if "error" in summary or score is None:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial.number, float(score))

    def work() -> int:
        return studies.drain([(studies.load(storage, name), run_trial)])

    return name, work


def _summaries(storage, name: str, out_dir: Path) -> dict[str, dict]:
    """Each final run's summary, from the study (a run may have trained on another machine, into
    its own path of the output directory): its paths resolved against this process's out_dir."""
    study = studies.load(storage, name)
    found = {}
    for trial in study.get_trials(deepcopy=False):
        if "summary" in trial.user_attrs:
            found[trial.user_attrs["job"]] = local(trial.user_attrs["summary"], out_dir)
    return found


def _chosen_configurations(config: RunConfig, settings: dict, params: dict[str, dict],
                            failed: dict, plans: dict) -> dict[str, dict]:
    """{row: per_method settings with its chosen parameters} for the rows whose search chose a
    method option (r, num_virtual_tokens, bottleneck ...), which their final runs train with."""
    from deltatune.compare.settings import row_settings

    chosen = {}
    for row, values in params.items():
        options = {k: v for k, v in (values or {}).items() if k != "lr"}  # the lr costs no memory
        if not options or row in failed or row not in plans:
            continue
        own = row_settings(settings["per_method"], row)
        chosen[row] = {**own, "method": {**own.get("method", {}), **options}}
    return chosen


def run_comparison(config: RunConfig, settings: dict, plans: dict, out_dir: Path, overwrite: bool,
                   run_method: Callable, forgetting: Callable, method_run_config: Callable,
                   join: bool = False, replan: Callable | None = None) -> list[dict]:
    """`plans`: each row's memory plan of its default configuration; `replan(per_method)` plans
    rows again with the settings their search chose (the plan MB column is what the final runs
    ran with, not the defaults)."""
    search = settings["search"]
    methods, seeds = settings["methods"], settings["seeds"]
    n_final = len(methods) * sum(len(seeds_at(settings, size))
                                 for size in run_sizes(settings, config.data.max_train_rows))
    url = studies.storage_url(search, out_dir)
    storage = studies.open_storage(url)
    metric = config.train.metric or default_metric(config.task)
    searched = {}
    if search:
        names, work = _search_queues(config, settings, out_dir, join, overwrite, storage, run_method,
                                     method_run_config)
        print("budget: " + _budget_line(config, settings, search, n_final), flush=True)
        for row in methods:
            if row in search["spaces"]:
                print(f"search {row}: {trials_for(search, row)} trials over {describe(search['spaces'][row])}",
                      flush=True)
        ran = studies.in_threads(settings["workers"], work)
        searched = collect(storage, dict(zip(methods, names)), search, metric)
        for row, result in searched.items():
            chosen = result["chosen"]
            print(f"search {row}: " + (f"best trial {chosen['number']} {chosen['params']}" if chosen else
                                       f"{result['indistinct']}: the method's defaults" if result["indistinct"] else
                                       "every trial failed"), flush=True)
        if join:
            print(f"--join: ran {ran} search trials here", flush=True)
    else:
        print("budget: " + _budget_line(config, settings, search, n_final), flush=True)
    params = {m: {**fixed_values(search["spaces"].get(m, {})), **(searched[m]["chosen"] or {}).get("params", {})}
              if search else {} for m in methods}
    failed = {m: "every trial diverged or failed in the search (" + "; ".join(
        f"trial {c['number']}: {c.get('why', c['status'])}" for c in searched[m]["candidates"]) + ")"
        for m in methods if search and searched[m]["best"] is None}
    if replan is not None and not join:  # before the runs: the process as clean as at the first plan
        plans = {**plans, **replan(_chosen_configurations(config, settings, params, failed, plans))}
    jobs = final_jobs(config, settings, out_dir, {m: p for m, p in params.items() if m not in failed},
                      method_run_config)
    name, work = _final_queue(storage, out_dir, jobs, settings, join, overwrite, run_method)
    ran = studies.in_threads(settings["workers"], work)
    if join:
        print(f"--join: ran {ran} final runs here; the comparison's own process writes the report", flush=True)
        return []
    done = _summaries(storage, name, out_dir)
    summaries = {key: done.get(job.id, {"error": "not run"}) for key, job in jobs.items()}
    if base_score.applies(config):  # generation: the untrained base is the no-skill level
        base = base_score.score_base(config, out_dir)
        summaries = {key: base_score.judge(summary, base) for key, summary in summaries.items()}
    forgot = None
    if config.task == "causal-lm":
        forgot = forgetting(config, settings, {jobs[k].id: s for k, s in summaries.items()})

    def rows_for(seed: int, size: int | None, with_plans: bool) -> list[dict]:
        runs = {m: summaries.get((m, seed, size)) or {"error": failed.get(m, "not run")} for m in methods}
        seed_forgot = None
        if forgot is not None:
            seed_forgot = {"base": forgot["base"]}
            seed_forgot.update({m: forgot.get(jobs[(m, seed, size)].id) for m in methods if (m, seed, size) in jobs})
        return build_rows(config, runs, plans if with_plans else {}, seed_forgot)

    rows = aggregate([rows_for(seed, None, True) for seed in seeds])
    for row in rows:
        if row["method"] in searched:
            result = searched[row["method"]]
            row["search"] = result["candidates"]
            row["chosen_params"] = (result["chosen"] or {}).get("params")
            row["chosen_lr"] = (row["chosen_params"] or {}).get("lr")
            if result["indistinct"]:
                row["search_indistinct"] = result["indistinct"]
    sections = []
    if search:
        sections += search_sections(searched, search, storage, out_dir, _atomic_write)
    curves = None
    if settings["data_sizes"]:
        curves = {}
        for size in run_sizes(settings, config.data.max_train_rows):
            curve_rows = aggregate([rows_for(seed, size, False) for seed in seeds_at(settings, size)])
            rows_seen = size or next((s["train_examples"] for (m, _, z), s in summaries.items()
                                      if z is None and "error" not in s), config.data.max_train_rows)
            curves[rows_seen] = curve_rows
        title = f"{config.model} on {Path(config.data.train).parent.name}"
        plot_curves(curves, out_dir / "curves.png", title, config.task, _atomic_write)
        _atomic_write(out_dir / "curves.json",
                      (json.dumps({str(k): v for k, v in curves.items()}, indent=2, default=str) + "\n").encode())
        sections.append(("Learning curves", curve_table(curves, config.task) + "\n\n![learning curves](curves.png)"))
    from deltatune.compare.verdicts import verdicts

    sections.append(("Verdicts on the seed's claims", verdicts(rows, curves, config.task, searched)))
    note = (f"mean ± std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}")
    if search:
        note += "; each method at the settings its search chose on held-out training rows"
    return write_outputs(out_dir, config, {}, plans, forgot, rows=rows, sections=sections, note=note)
