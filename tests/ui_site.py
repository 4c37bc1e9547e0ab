"""A runs folder for the `deltatune ui` tests, written by the library's own writers: a tiny BERT
comparison (trained in this process, as `compare` would in children; report.write_outputs for
its results), a tiny chat-Llama run, and the data and configs the launch form points at."""
from __future__ import annotations

from pathlib import Path

import yaml

from tiny_runs import alpaca_rows, sentiment_rows, tiny_bert_dir, tiny_llama_dir, write_jsonl

COMPARED = ["lora", "prompt"]


def make_site(root: Path) -> dict:
    root = Path(root)
    site = {"root": root, "runs": root / "runs", "bert": tiny_bert_dir(root), "llama": tiny_llama_dir(root)}
    site["train"] = write_jsonl(root / "data" / "train.jsonl", sentiment_rows(64, seed=1))
    site["dev"] = write_jsonl(root / "data" / "dev.jsonl", sentiment_rows(32, seed=2))
    site["alpaca"] = write_jsonl(root / "data" / "alpaca.jsonl", alpaca_rows(32, seed=1))
    site["runs"].mkdir()
    return site


def bert_config(site: dict, output_dir: Path, **train) -> dict:
    return {"model": str(site["bert"]), "task": "classification",
            "data": {"train": str(site["train"]), "eval": str(site["dev"]), "max_length": 32},
            "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]},
            "train": {"batch_size": 8, "lr": 5e-3, "log_every": 1, "bf16": False, "max_steps": 4,
                      "eval_every": 2, **train},
            "output_dir": str(output_dir)}


def start_comparison(site: dict, name: str = "cmp") -> Path:
    """A comparison as `compare` leaves it before its first method finishes: config.yaml only."""
    from deltatune.config.run import save_run_config
    from deltatune.compare.settings import read_compare_config

    out = site["runs"] / name
    values = {**bert_config(site, out), "compare": {"methods": COMPARED}}
    path = site["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    config, _ = read_compare_config(str(path), [])
    out.mkdir()
    save_run_config(config, out / "config.yaml")
    return path


def train_compared_method(site: dict, config_path: Path, method: str) -> dict:
    """Train one method of the comparison exactly as `compare` configures it (in this process)."""
    from deltatune.compare.runner import method_run_config
    from deltatune.compare.settings import read_compare_config
    from deltatune.training.loop import train_from_config

    config, settings = read_compare_config(str(config_path), [])
    out = Path(config.output_dir)
    values = method_run_config(config, settings, method, out)
    path = out / "configs" / f"{method}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return train_from_config(str(path), [], overwrite=True)


def finish_comparison(site: dict, config_path: Path, runs: dict) -> list[dict]:
    from deltatune.compare.report import write_outputs
    from deltatune.compare.settings import read_compare_config

    config, _ = read_compare_config(str(config_path), [])
    return write_outputs(Path(config.output_dir), config, runs, {}, None)


def train_chat_run(site: dict, name: str = "chat") -> dict:
    from deltatune.training.loop import train_from_config

    values = {"model": str(site["llama"]), "task": "causal-lm",
              "data": {"train": str(site["alpaca"]), "format": "alpaca", "max_length": 128},
              "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
              "train": {"batch_size": 4, "lr": 1e-2, "log_every": 1, "bf16": False, "max_steps": 2},
              "output_dir": str(site["runs"] / name)}
    path = site["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return train_from_config(str(path), [])
