"""The no-skill level of a generation comparison: the untrained base model's own score.

For classification a run that learned nothing scores the majority class's share, which every run
knows from its eval labels (training/collapse.py). A generation task scored by exact match has no
such level: an untrained causal LM may already answer some rows, and a tuned one that gets no
further has learned nothing. So a comparison whose task is causal-lm and whose metric is
exact_match scores the base model, untouched, once: on the same eval rows (data.eval, its first
data.max_eval_rows), with the same metric, eval batch size and precision as the final runs.

The score is kept in OUT/base/score.json beside the key it was made with (the model, its
quantization, the data settings, the eval file's content fingerprint, batch size, precision), like
a final run's key.json: a rerun with the same key reuses it. The comparison's own process scores it
after the final runs (it is one evaluation, not a training run); --join workers never do.

A final run learned when its score is above the base's by more than `margin`: one binomial
standard error of the base score on the eval rows, sqrt(p (1 - p) / n), and never less than one
row (1 / n), so a single lucky answer is not skill. A run at or under that line is marked "did not
learn" exactly as a classifier at the majority class is.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from deltatune.config.run import RunConfig

FILE = Path("base") / "score.json"
SEARCH_FILE = Path("search") / "base-score.json"   # the same, on the search's held-out rows
KIND = "untrained base"


def applies(config: RunConfig) -> bool:
    """A generation comparison: a causal LM scored by exact match."""
    return config.task == "causal-lm" and config.train.metric == "exact_match"


def margin(score: float, rows: int) -> float:
    """How far above the base score a run must be to count as learned (see the module doc)."""
    rows = max(rows, 1)
    return max(math.sqrt(score * (1 - score) / rows), 1 / rows)


def _settings(config: RunConfig) -> dict[str, Any]:
    import torch

    from deltatune.training.optimization import resolve_bf16

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {"device": device, "bf16": resolve_bf16(config.train.bf16, device),
            "batch_size": config.train.eval_batch_size or config.train.batch_size}


def base_key(config: RunConfig, settings: dict[str, Any]) -> dict[str, Any]:
    from deltatune.compare.jobs import fingerprint

    data = dataclasses.asdict(config.data)
    for train_only in ("train", "max_train_rows"):
        data.pop(train_only, None)
    eval_file = config.data.eval
    stamp = (fingerprint(eval_file) if eval_file and not str(eval_file).startswith("hf:")
             and Path(eval_file).exists() else None)
    return json.loads(json.dumps({
        "model": config.model, "quantize": config.quantize, "metric": config.train.metric,
        "data": data, "eval_file": stamp, "batch_size": settings["batch_size"], "bf16": settings["bf16"],
        "seed": config.train.seed}, default=str))


def evaluate_base(config: RunConfig, settings: dict[str, Any]) -> dict[str, float]:
    """The untouched base's metrics on the comparison's eval rows, as the trainer evaluates."""
    from deltatune.data.dataset import Collator, build_dataset
    from deltatune.models import load_model, release_freed_memory
    from deltatune.training.evaluation import evaluate_model

    model, tokenizer = load_model(config.model, task="causal-lm", quantize=config.quantize)
    dataset = build_dataset(config.data, tokenizer, "causal-lm", "eval", config.train.seed)
    model.to(settings["device"])
    metrics = evaluate_model(model, dataset, "causal-lm", Collator(tokenizer.pad_token_id),
                             batch_size=settings["batch_size"], bf16=settings["bf16"], tokenizer=tokenizer,
                             with_exact_match=True)
    del model
    release_freed_memory()
    return metrics


def score_base(config: RunConfig, out_dir: Path, file: Path = FILE,
               rows_name: str = "eval rows") -> dict[str, Any]:
    """{"score", "metric", "examples", "margin", "kind"}: reused from OUT/`file` when its key
    matches, else evaluated now and written there. The search scores the base on its held-out
    rows into SEARCH_FILE (`config` then evaluates on those)."""
    settings = _settings(config)
    key = base_key(config, settings)
    path = Path(out_dir) / file
    if path.exists():
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:  # cut short while written: scored again
            record = {}
        if record.get("key") == key:
            print(f"base model: {record['metric']} {record['score']:.2%} on {record['examples']} {rows_name} "
                  "(reused: scored earlier with these settings)", flush=True)
            return record
    print(f"base model: scoring the untrained base on the {rows_name} (the no-skill level) ...", flush=True)
    metrics = evaluate_base(config, settings)
    metric = config.train.metric
    rows = int(metrics["examples"])
    record = {"score": metrics[metric], "metric": metric, "examples": rows,
              "margin": margin(metrics[metric], rows), "kind": KIND, "loss": metrics.get("loss"), "key": key}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    print(f"base model: {metric} {record['score']:.2%} on {rows} {rows_name}", flush=True)
    return record


def judge(summary: dict, base: dict) -> dict:
    """The final run's summary with the base recorded and, when its score is not above the base's
    by more than the margin, marked as not learned (the trainer's own verdict, if any, stays)."""
    if "error" in summary:
        return summary
    judged = dict(summary)
    judged["base_score"] = {k: base[k] for k in ("score", "metric", "examples", "margin", "kind")}
    score = (summary.get("final_eval") or {}).get(base["metric"])
    if score is None or summary.get("learned") is False:
        return judged
    if score <= base["score"] + base["margin"]:
        judged["learned"] = False
        judged["did_not_learn"] = {
            "reason": (f"its {base['metric']} {score:.2%} is not above the untrained base's "
                       f"{base['score']:.2%} by more than {base['margin']:.2%} (one standard error "
                       f"on {base['examples']} eval rows, at least one row)"),
            "advice": "more steps, a larger train.lr, or more training rows; the base already "
                      "scores this much without any tuning"}
    elif judged.get("learned") is None:
        judged["learned"] = True
    return judged


def judge_trial(verdict: dict, base: dict) -> dict:
    """A search trial's verdict (search.judge) held to the same line on the held-out rows: a
    trial whose score is not above the base's there by more than the margin learned nothing, so
    a search whose every trial is at that line says so instead of choosing among them."""
    if verdict.get("status") != "ok" or verdict.get("learned") is False:
        return verdict
    if verdict["score"] <= base["score"] + base["margin"]:
        return {**verdict, "learned": False,
                "why_not_learned": (f"{base['metric']} not above the untrained base's {base['score']:.2%} "
                                    f"on {base['examples']} held-out rows")}
    return verdict
