"""`deltatune compare`: train every method on the same task, data and budget, and measure each.

Each method trains in its own process (`deltatune train` on a generated config), so its peak
memory is its own; the comparison then reads each run's summary.json, measures forgetting for
causal LMs (perplexity on general text, tuned minus base), and writes report.md, results.json,
results.csv and tradeoffs.png.

The `compare:` section of a run config (all optional):
    methods: [full, lora, adapter, prompt, ptuning, prefix]   # lora@nf4: LoRA on an nf4 base
    per_method:                 # settings of one method only; anything else is shared
      lora: {method: {r: 16}, train: {lr: 1.0e-3}}
    forgetting_data: ../shared/data/wikitext2/test.jsonl   # causal LMs only
    forgetting_max_rows: 300
    search: {trials: 8}        # per-method Optuna search on held-out TRAINING rows (compare/search.py)
    seeds: [0, 1]; data_sizes: [250, 1000]; workers: 2   # compare/repeats.py, compare/jobs.py
"""
from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from deltatune.config.run import save_run_config
from deltatune.errors import DeltatuneError
from deltatune.compare.live import child_env, last_line, run_relayed
from deltatune.compare.study import storage_url
from deltatune.compare.settings import check_row, read_compare_config, row_settings, split_row
from deltatune.tracking import check_installed
from deltatune.tracking.comparison import comparison_tracking

def method_run_config(config, settings: dict, name: str, out_dir: Path) -> dict:
    """The full run config (as a dict) that trains method `name` in this comparison."""
    values = copy.deepcopy(dataclasses.asdict(config))
    values.pop("compare", None)
    method, quantize = split_row(name)  # `lora@nf4`: LoRA on an nf4-quantized base
    own = row_settings(settings["per_method"], name)
    base_method = values["method"] if values["method"].get("name") == method else {}
    values["method"] = {**base_method, **own.get("method", {}), "name": method}
    values["train"].update(own.get("train", {}))
    values["data"].update(own.get("data", {}))
    if quantize is not None:
        values["quantize"] = quantize
    values["output_dir"] = str(out_dir / "runs" / name)
    return values


def run_method(values: dict, out_dir: Path, on_start=None) -> dict[str, Any]:
    """Train one method in a child process, its progress shown live (compare/live.py); returns
    its summary (or the one-line error: the last line of its stderr). `on_start`: see run_relayed."""
    config_path = out_dir / "configs" / f"{Path(values['output_dir']).name}.yaml"  # the row's name
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(values, sort_keys=False))
    command = [sys.executable, "-m", "deltatune.cli", "train", str(config_path), "--overwrite"]
    returncode, tail = run_relayed(command, child_env(), on_start=on_start)
    if returncode != 0:
        return {"error": last_line(tail, returncode)}
    return json.loads((Path(values["output_dir"]) / "summary.json").read_text())


def forgetting(config, settings: dict, runs: dict[str, dict]) -> dict[str, dict]:
    """Perplexity on general text of each tuned model, and of the base, for causal LMs."""
    from deltatune.adapters_io import load_adapter
    from deltatune.config.run import DataConfig
    from deltatune.data.dataset import Collator, build_dataset
    from deltatune.training.evaluation import evaluate_model
    from deltatune.models import load_model
    from deltatune.quantization import recorded_quantization
    from deltatune.training.optimization import resolve_bf16

    import torch

    data = DataConfig(train=None, eval=settings["forgetting_data"], format="text",
                      max_length=settings["forgetting_max_length"],
                      max_eval_rows=settings["forgetting_max_rows"])
    base, tokenizer = load_model(config.model, task="causal-lm", quantize=config.quantize)
    dataset = build_dataset(data, tokenizer, "causal-lm", "eval")
    collator = Collator(tokenizer.pad_token_id)
    bf16 = resolve_bf16(config.train.bf16, torch.device("cpu"))

    def perplexity(model) -> float:
        return evaluate_model(model, dataset, "causal-lm", collator, batch_size=8, bf16=bf16)["perplexity"]

    base_ppl = perplexity(base)
    results = {"base": {"perplexity": base_ppl}}
    for name, summary in runs.items():
        if "error" in summary:
            continue
        model, _ = load_model(config.model, task="causal-lm",  # on the base it trained on
                              quantize=recorded_quantization(summary["output_dir"]))
        load_adapter(model, summary["output_dir"])
        ppl = perplexity(model)
        results[name] = {"perplexity": ppl, "delta": ppl - base_ppl}
        del model
    return results


def _shown_url(url: str) -> str:
    """A storage URL as the parent run may show it: any password masked."""
    from sqlalchemy.engine import make_url
    return make_url(url).render_as_string(hide_password=True)


def compare_from_config(config_path: str, overrides: list[str], methods: str | None = None,
                        overwrite: bool = False, join: bool = False) -> list[dict]:
    """`join`: a worker beside the comparison's own process (same config and storage): it runs
    search trials and final runs from the shared study and writes no report."""
    from deltatune.compare.plan import plan_methods
    from deltatune.compare.search import read_search
    from deltatune.compare.settings import row_method_options
    from deltatune.models import release_freed_memory

    config, settings = read_compare_config(config_path, overrides)
    if methods:
        settings["methods"] = [m.strip() for m in methods.split(",") if m.strip()]
        for name in settings["methods"]:
            check_row(name, "--methods")
        settings["search"] = read_search((config.compare or {}).get("search"), settings["methods"],
                                         row_method_options(config, settings["per_method"], settings["methods"]))
    if (settings["search"] or {}).get("storage"):  # a bad URL or an unreachable database: now, in one line
        from deltatune.compare.study import open_storage

        open_storage(settings["search"]["storage"])
    out_dir = Path(config.output_dir).resolve()  # absolute: records name paths relative to it (jobs.portable)
    # An earlier comparison here (it has jobs/) is continued: finished runs with the same settings
    # are reused, stale ones refused unless --overwrite (compare.jobs). Anything else is not ours.
    if (not join and out_dir.exists() and any(out_dir.iterdir()) and not overwrite
            and not (out_dir / "jobs").is_dir() and not (out_dir / "study.db").exists()):
        raise DeltatuneError(f"{out_dir}: output directory exists (pass --overwrite to replace it)")
    check_installed(config.train.report_to)  # a missing tracker fails before any planning
    out_dir.mkdir(parents=True, exist_ok=True)
    plans = {}
    if not join:
        save_run_config(config, out_dir / "config.yaml")
        print(f"planning {', '.join(settings['methods'])} ...", flush=True)
        plans = {p.method: p for p in plan_methods(config, settings["methods"], settings["per_method"])}
        release_freed_memory()
    from deltatune.compare.fair import run_comparison  # search, seeds, sizes, reuse: compare/fair.py

    # MLflow: one parent run naming the study, each child run under it; W&B: one group
    # (tracking/comparison.py). A --join worker adds runs to the study, not a second parent.
    if join:
        return run_comparison(config, settings, plans, out_dir, overwrite, run_method=run_method,
                              forgetting=forgetting, method_run_config=method_run_config, join=True)
    def replan(chosen: dict[str, dict]) -> dict:
        """Plans of the rows whose search chose other method options than their defaults."""
        if not chosen:
            return {}
        print(f"planning {', '.join(chosen)} again at the settings their search chose ...", flush=True)
        found = {p.method: p for p in plan_methods(config, list(chosen), chosen)}
        release_freed_memory()
        return found

    with comparison_tracking(config, out_dir, study=_shown_url(storage_url(settings["search"], out_dir))) as tracking:
        rows = run_comparison(config, settings, plans, out_dir, overwrite, run_method=run_method,
                              forgetting=forgetting, method_run_config=method_run_config, replan=replan)
        tracking.finish(rows)
    return rows
