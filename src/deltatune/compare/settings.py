"""The `compare:` section of a run config: which methods, what differs per method, forgetting data.

Read here, apart from the runner, so that `plan` and `compare` both use it without importing
each other.
"""
from __future__ import annotations

from pathlib import Path

from deltatune.config.run import load_run_config, resolve_data_path
from deltatune.errors import DeltatuneError
from deltatune.methods import REGISTRY

ALL_METHODS = ["full", "lora", "adapter", "prompt", "ptuning", "prefix"]
SETTINGS = {"methods", "per_method", "forgetting_data", "forgetting_max_rows", "forgetting_max_length",
            "search", "seeds", "data_sizes", "workers"}
DEFAULT_FORGETTING_DATA = "../shared/data/wikitext2/test.jsonl"


def read_compare_config(path: str, overrides: list[str]):
    """(the shared RunConfig, the validated `compare:` settings)."""
    config = load_run_config(path, overrides)
    settings = dict(config.compare or {})
    for key in settings:
        if key not in SETTINGS:
            raise DeltatuneError(f"compare.{key}: unknown key (known: {', '.join(sorted(SETTINGS))})")
    methods = settings.get("methods") or [m for m in ALL_METHODS if m in REGISTRY]
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",")]
    for name in methods:
        if name not in REGISTRY:
            raise DeltatuneError(f"compare.methods: unknown method {name!r} (known: {', '.join(REGISTRY)})")
    per_method = settings.get("per_method") or {}
    for name, values in per_method.items():
        if name not in REGISTRY:
            raise DeltatuneError(f"compare.per_method.{name}: unknown method")
        for key in values:
            if key not in ("method", "train", "data"):
                raise DeltatuneError(f"compare.per_method.{name}.{key}: only method, train and data "
                                     "can differ per method")
    base_dir = Path(path).resolve().parent
    settings.update(
        methods=methods, per_method=per_method,
        forgetting_data=resolve_data_path(settings.get("forgetting_data", DEFAULT_FORGETTING_DATA), base_dir),
        forgetting_max_rows=int(settings.get("forgetting_max_rows", 300)),
        forgetting_max_length=int(settings.get("forgetting_max_length", 256)))
    from deltatune.compare.repeats import read_repeats
    from deltatune.compare.search import read_search

    settings.update(read_repeats(settings, config.train.seed, config.data.max_train_rows),
                    search=read_search(settings.get("search"), methods))
    return config, settings
