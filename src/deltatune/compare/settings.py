"""The `compare:` section of a run config: which methods, what differs per method, forgetting data.

Read here, apart from the runner, so that `plan` and `compare` both use it without importing
each other.
"""
from __future__ import annotations

from pathlib import Path

from deltatune.config.run import RunConfig, load_run_config, resolve_data_path
from deltatune.errors import DeltatuneError
from deltatune.methods import REGISTRY, method_config_for, method_names

# The default list: one of each family. Variants (dora, prefix-lstm), the alternative
# parametrisations of a family already listed (boft, loha, lokr: below LoRA and OFT on the MiniLM
# demo at their defaults, docs/methods) and bitfit (most decoders — Llama, Qwen, SmolLM2 — have no
# biases for it to train) are picked by name.
ALL_METHODS = ["full", "lora", "adapter", "prompt", "ptuning", "prefix", "ia3", "oft", "vera",
               "adalora", "ln-tuning"]
SETTINGS = {"methods", "per_method", "forgetting_data", "forgetting_max_rows", "forgetting_max_length",
            "search", "seeds", "data_sizes", "curve_seeds", "workers"}
DEFAULT_FORGETTING_DATA = "../shared/data/wikitext2/test.jsonl"


def split_row(row: str) -> tuple[str, str | None]:
    """A comparison row is a method, optionally on a quantized base: `lora@nf4` -> (lora, nf4)."""
    method, sep, quantize = row.partition("@")
    return method, (quantize if sep else None)


def row_settings(per_method: dict, row: str) -> dict:
    """per_method settings of a row: its method's, then the row's own (`lora@nf4:`) over them."""
    method, _ = split_row(row)
    own = {k: dict(v) for k, v in (per_method.get(method) or {}).items()}
    if row != method:
        for key, values in (per_method.get(row) or {}).items():
            own[key] = {**own.get(key, {}), **values}
    return own


def read_compare_config(path: str, overrides: list[str]) -> tuple[RunConfig, dict]:
    """(the shared RunConfig, the validated `compare:` settings)."""
    config = load_run_config(path, overrides, comparison=True)  # `method:` optional here
    if config.method:  # options for the method it names: checked as `deltatune train` would
        method_config_for(config)
    settings = dict(config.compare or {})
    for key in settings:
        if key not in SETTINGS:
            raise DeltatuneError(f"compare.{key}: unknown key (known: {', '.join(sorted(SETTINGS))})")
    methods = settings.get("methods") or [m for m in ALL_METHODS if m in REGISTRY]
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",")]
    for name in methods:
        check_row(name, "compare.methods")
    per_method = settings.get("per_method") or {}
    for name, values in per_method.items():
        if split_row(name)[0] not in method_names():
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
                    search=read_search(settings.get("search"), methods, row_method_options(config, per_method, methods)))
    return config, settings


def row_method_options(config: RunConfig, per_method: dict, rows: list[str]) -> dict[str, dict]:
    """Each row's `method:` mapping as its runs get it (the search checks its space against it)."""
    options = {}
    for row in rows:
        method = split_row(row)[0]
        shared = config.method if (config.method or {}).get("name") == method else {}
        options[row] = {**shared, **row_settings(per_method, row).get("method", {}), "name": method}
    return options


def check_row(row: str, where: str) -> None:
    """A method name, or method@nf4|fp4|int8 (that method on a quantized base; not full)."""
    from deltatune.quantization import parse_quantize

    method, quantize = split_row(row)
    if method not in method_names():
        raise DeltatuneError(f"{where}: unknown method {method!r} (known: {', '.join(method_names())})")
    if quantize is not None:
        if quantize in ("", "none") or parse_quantize(quantize, where=f"{where} {row}") is None:
            raise DeltatuneError(f"{where}: {row!r}: name a quantization after @ (nf4, fp4, int8)")
        if method == "full":
            raise DeltatuneError(f"{where}: {row!r}: full fine-tuning cannot train a quantized base")
