"""What the search tunes for each method: its declared space, narrowed or overridden by the config.

Each method declares its space next to its config (`Method.search_space`); the lr is always
searched, log-uniform from a tenth to ten times the method's default. `compare.search.space`
changes a parameter for every method that has it, `compare.search.per_method.NAME` for one:

    auto                 the method's declared values (for lr: default / 10 .. default x 10, log)
    [low, high, log]     a range (log or linear); integers give an integer range
    [4, 8, 16]           any other list: a choice
    8                    a single value: fixed, not searched
    null                 not searched: the method's own default

A space is {parameter: ("range", low, high, log) | ("choice", [values])}. Every value a space can
produce is checked against the method's config before anything trains, so `r: [0, 8]` is one
line naming the key, not a failed trial.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from deltatune.errors import DeltatuneError
from deltatune.methods import config_from_dict, default_lr_for, get_method

LR_SPREAD = 10.0  # auto lr: default / 10 .. default x 10


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_value(value: Any, where: str) -> tuple | None:
    """One parameter's setting as ("range", low, high, log) | ("choice", values) | None (off)."""
    if value is None:
        return None
    if isinstance(value, tuple) and len(value) == 3 and value[2] in ("log", "linear"):
        value = list(value)  # a method's declared range
    if isinstance(value, list):
        if len(value) == 3 and value[2] in ("log", "linear"):
            low, high, scale = value
            if not (_is_number(low) and _is_number(high) and low < high):
                raise DeltatuneError(f"{where}: a range is [low, high, log|linear] with low < high, got {value!r}")
            if scale == "log" and low <= 0:
                raise DeltatuneError(f"{where}: a log range needs low > 0, got {value!r}")
            return ("range", low, high, scale == "log")
        if not value:
            raise DeltatuneError(f"{where}: an empty list; give a range [low, high, log] or choices")
        for choice in value:
            if not (choice is None or isinstance(choice, (bool, int, float, str))):
                raise DeltatuneError(f"{where}: a choice must be a number, text, true/false or null, "
                                     f"got {choice!r}")
        return ("choice", list(value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("choice", [value])
    raise DeltatuneError(f"{where}: expected auto, [low, high, log|linear], a list of choices or one value, "
                         f"got {value!r}")


def searchable(method: str) -> list[str]:
    """The parameters a method's search may name: lr, then its config's options."""
    config = get_method(method).config
    return ["lr"] + [f.name for f in dataclasses.fields(config) if f.name != "modules_to_save"]


def resolve_space(method_options: dict, shared: dict, own: dict, where: str) -> dict[str, tuple]:
    """The space of one comparison row. `method_options`: the row's `method:` mapping (name
    included); `shared`: compare.search.space; `own`: compare.search.per_method.ROW."""
    name = method_options["name"]
    method = get_method(name)
    base = config_from_dict(method_options)
    declared = {"lr": "auto", **{k: "auto" for k in method.search_space}}
    known = searchable(name)
    settings = dict(declared)
    for key, value in shared.items():
        if key in known:  # a shared parameter applies to the methods that have it
            settings[key] = value
    for key, value in own.items():
        if key not in known:
            raise DeltatuneError(f"{where}.{key}: {name} has no parameter {key!r} "
                                 f"(searchable: {', '.join(known)})")
        settings[key] = value
    space = {}
    for key, value in settings.items():
        spot = f"{where}.{key}" if key in own else f"compare.search.space.{key}"
        if value == "auto":
            if key == "lr":
                default = default_lr_for(base)
                value = [float(f"{default / LR_SPREAD:.3g}"), float(f"{default * LR_SPREAD:.3g}"), "log"]
            elif key in method.search_space:
                value = method.search_space[key]
            else:
                raise DeltatuneError(f"{spot}: {name} declares no values for {key!r}; "
                                     "give a range [low, high, log] or a list of choices")
        parsed = parse_value(value, spot)
        if parsed is None:
            continue
        check_values(method_options, key, parsed, spot)
        space[key] = parsed
    return space


def check_values(method_options: dict, key: str, parsed: tuple, where: str) -> None:
    """Every value the space can produce must be one the method takes (its config validates)."""
    if key == "lr":
        values = parsed[1:3] if parsed[0] == "range" else parsed[1]
        for value in values:
            if not _is_number(value) or value <= 0:
                raise DeltatuneError(f"{where}: {value!r} is not an lr (a positive number)")
        return
    values = parsed[1:3] if parsed[0] == "range" else parsed[1]
    for value in values:
        try:
            config_from_dict({**method_options, key: value})
        except DeltatuneError as exc:
            raise DeltatuneError(f"{where}: {value!r} is not a value {method_options['name']} can take "
                                 f"({exc})") from None


def suggest(trial: Any, space: dict[str, tuple]) -> dict[str, Any]:
    """The trial's parameters (optuna: sampled, or fixed by an enqueued/retried trial)."""
    params = {}
    for key, spec in space.items():
        if spec[0] == "range":
            _, low, high, log = spec
            if isinstance(low, int) and isinstance(high, int):
                params[key] = trial.suggest_int(key, low, high, log=log)
            else:
                params[key] = trial.suggest_float(key, float(low), float(high), log=log)
        else:
            choices = spec[1]
            params[key] = choices[0] if len(choices) == 1 else trial.suggest_categorical(key, choices)
    return params


def fixed_values(space: dict[str, tuple]) -> dict[str, Any]:
    """The space's single-value entries: settings the user fixed, not searched. Optuna records
    only what it sampled, so the final runs take these from here, chosen trial or defaults alike."""
    return {key: spec[1][0] for key, spec in space.items() if spec[0] != "range" and len(spec[1]) == 1}


def apply_params(values: dict, params: dict[str, Any]) -> dict:
    """A run config (dict) with a trial's parameters: lr into train, the rest into method."""
    for key, value in params.items():
        if key == "lr":
            values["train"]["lr"] = value
        else:
            values["method"][key] = value
    return values


def describe(space: dict[str, tuple]) -> str:
    parts = []
    for key, spec in space.items():
        if spec[0] == "range":
            parts.append(f"{key} {spec[1]:g}..{spec[2]:g}{' log' if spec[3] else ''}")
        else:
            parts.append(f"{key} {{{', '.join(map(str, spec[1]))}}}" if len(spec[1]) > 1 else f"{key} {spec[1][0]}")
    return ", ".join(parts)


def heaviest(space: dict[str, tuple]) -> dict[str, Any]:
    """The space's largest value of every numeric option (rank, bottleneck, virtual tokens ...):
    what `plan` predicts memory for. The lr costs no memory and is left out."""
    values = {}
    for key, spec in space.items():
        if key == "lr":
            continue
        options = [spec[2]] if spec[0] == "range" else [v for v in spec[1] if _is_number(v)]
        if options:
            values[key] = max(options)
    return values
