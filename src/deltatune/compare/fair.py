"""A fair comparison: each method at its own searched lr, over seeds and data sizes, then verdicts.

Stages (each a batch of `deltatune train` children run by compare.jobs, reused when finished):
1. search (compare.search): short runs per candidate lr on a held-out slice of the training file;
2. final runs: every method x seed (x data size) at its chosen lr;
3. forgetting of every final run (causal LMs), rows per seed -> mean ± std, curves, verdicts.
The runner passes in its own run_method / forgetting / method_run_config, so this module depends
on none of the runner's internals (and there is no import circle).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from deltatune.compare.jobs import Job, check_stale, expected_steps, run_jobs
from deltatune.compare.repeats import aggregate, curve_table, plot_curves
from deltatune.compare.report import _atomic_write, build_rows, write_outputs
from deltatune.compare.search import candidate_lrs, candidate_values, choose, judge, split_training
from deltatune.compare.verdicts import search_table, verdicts
from deltatune.config.run import RunConfig
from deltatune.methods import config_from_dict, default_lr_for


def _budget_line(config: RunConfig, settings: dict, search: dict | None, n_search: int, n_final: int) -> str:
    parts = []
    if search:
        steps = f"{search['steps']} steps" if search["steps"] else f"{config.train.epochs} epoch(s)"
        parts.append(f"search: {n_search} candidate runs ({steps} each on {search['rows']} training rows, "
                     f"scored on {search['heldout_rows']} held-out training rows)")
    parts.append(f"final: {n_final} runs ({len(settings['methods'])} methods x {len(settings['seeds'])} "
                 f"seed(s) x {1 + len(settings['data_sizes'])} data size(s))")
    return "; ".join(parts) + f"; {settings['workers']} worker(s)"


def run_search(config: RunConfig, settings: dict, out_dir: Path, overwrite: bool,
               run_method: Callable, method_run_config: Callable) -> dict[str, dict]:
    """{method: {"candidates": [...], "chosen": {...} | None}}."""
    search = settings["search"]
    fit, heldout = split_training(config, search, out_dir)
    jobs, lrs = [], {}
    for name in settings["methods"]:
        values = method_run_config(config, settings, name, out_dir)
        values["train"]["seed"] = settings["seeds"][0]
        lrs[name] = candidate_lrs(search, name, default_lr_for(config_from_dict(values["method"])))
        for lr in lrs[name]:
            job_id = f"search-{name}-lr{lr:g}"
            candidate = candidate_values(values, lr, fit, heldout, search, out_dir / "runs" / job_id)
            jobs.append(Job(job_id, candidate, expected_steps(candidate, search["rows"]),
                            f"search {name} lr {lr:g}"))
    check_stale(jobs, out_dir, overwrite)
    done = run_jobs(jobs, out_dir, settings["workers"], run_method, "search")
    result = {}
    for name in settings["methods"]:
        candidates = [{"lr": lr, **judge(done[f"search-{name}-lr{lr:g}"])} for lr in lrs[name]]
        result[name] = {"candidates": candidates, "chosen": choose(candidates)}
        shown = ", ".join(f"{c['lr']:g}: " + (f"{c['score']:.4f}" if c["status"] == "ok" else c["status"])
                          for c in candidates)
        chosen = result[name]["chosen"]
        print(f"search {name}: {shown} -> " + (f"lr {chosen['lr']:g}" if chosen else "every candidate failed"),
              flush=True)
    return result


def final_jobs(config: RunConfig, settings: dict, out_dir: Path, lrs: dict[str, float | None],
               method_run_config: Callable) -> dict[tuple, Job]:
    """{(method, seed, size or None): Job}; size None is the run's own training budget."""
    jobs = {}
    sizes = [None] + [s for s in settings["data_sizes"] if s != config.data.max_train_rows]
    for name in settings["methods"]:
        if name not in lrs:
            continue
        for size in sizes:
            for seed in settings["seeds"]:
                job_id = name + (f"-s{seed}" if len(settings["seeds"]) > 1 else "") + (f"-n{size}" if size else "")
                values = method_run_config(config, settings, name, out_dir)
                values["output_dir"] = str(out_dir / "runs" / job_id)
                values["train"]["seed"] = seed
                if lrs[name] is not None:
                    values["train"]["lr"] = lrs[name]
                if size:
                    values["data"]["max_train_rows"] = size
                rows = size or config.data.max_train_rows
                label = f"{name} seed {seed}" + (f" on {size} rows" if size else "")
                jobs[(name, seed, size)] = Job(job_id, values, expected_steps(values, rows), label)
    return jobs


def run_comparison(config: RunConfig, settings: dict, plans: dict, out_dir: Path, overwrite: bool,
                   run_method: Callable, forgetting: Callable, method_run_config: Callable) -> list[dict]:
    search = settings["search"]
    methods, seeds = settings["methods"], settings["seeds"]
    n_search = sum(len(candidate_lrs(search, m, 1.0)) for m in methods) if search else 0  # only the count
    n_final = len(methods) * len(seeds) * (1 + len([s for s in settings["data_sizes"]
                                                    if s != config.data.max_train_rows]))
    print("budget: " + _budget_line(config, settings, search, n_search, n_final), flush=True)
    searched = run_search(config, settings, out_dir, overwrite, run_method, method_run_config) if search else {}
    lrs = {m: (searched[m]["chosen"] or {}).get("lr") if search else None for m in methods}
    failed = {m: "every lr diverged or failed in the search (" + "; ".join(
        f"{c['lr']:g}: {c.get('why', c['status'])}" for c in searched[m]["candidates"]) + ")"
        for m in methods if search and lrs[m] is None}
    jobs = final_jobs(config, settings, out_dir, {m: lr for m, lr in lrs.items() if m not in failed},
                      method_run_config)
    check_stale(list(jobs.values()), out_dir, overwrite)
    done = run_jobs(list(jobs.values()), out_dir, settings["workers"], run_method, "final")
    summaries = {key: done[job.id] for key, job in jobs.items()}
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
            row["search"] = searched[row["method"]]["candidates"]
            row["chosen_lr"] = lrs[row["method"]]
    sections = []
    if search:
        sections.append(("Learning-rate search", search_table(searched, search)))
    curves = None
    if settings["data_sizes"]:
        curves = {}
        for size in [None] + [s for s in settings["data_sizes"] if s != config.data.max_train_rows]:
            curve_rows = aggregate([rows_for(seed, size, False) for seed in seeds])
            rows_seen = size or next((s["train_examples"] for (m, _, z), s in summaries.items()
                                      if z is None and "error" not in s), config.data.max_train_rows)
            curves[rows_seen] = curve_rows
        title = f"{config.model} on {Path(config.data.train).parent.name}"
        plot_curves(curves, out_dir / "curves.png", title, config.task, _atomic_write)
        _atomic_write(out_dir / "curves.json",
                      (json.dumps({str(k): v for k, v in curves.items()}, indent=2, default=str) + "\n").encode())
        sections.append(("Learning curves", curve_table(curves, config.task) + "\n\n![learning curves](curves.png)"))
    sections.append(("Verdicts on the seed's claims", verdicts(rows, curves, config.task)))
    note = (f"mean ± std over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}")
    if search:
        note += "; each method at the lr its search chose on held-out training rows"
    return write_outputs(out_dir, config, {}, plans, forgot, rows=rows, sections=sections, note=note)
