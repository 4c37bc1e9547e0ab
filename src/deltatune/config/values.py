"""The value layer of run configs: YAML reading, command-line scalars, typed config sections.

`ConfigSection` is the base of the `data:` and `train:` dataclasses: on construction every field
is checked against its type hint (ints are accepted where floats are wanted) and `validate` runs;
every error is one line naming `section.key`.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from deltatune.errors import DeltatuneError


# ---------------------------------------------------------------------------------- YAML
class YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `3e-4` as a float (YAML 1.1 insists on `3.0e-4`)."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_scalar(text: str) -> Any:
    """A command-line value read as YAML (`16` -> int, `3e-4` -> float, `[q, v]` -> list);
    text that is not valid YAML stays a string."""
    try:
        return yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError:
        return text


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise DeltatuneError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DeltatuneError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        raw = yaml.load(text, Loader=YamlLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise DeltatuneError(f"{where}: YAML syntax error: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise DeltatuneError(f"{path}: YAML error: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DeltatuneError(f"{path}: expected a mapping of keys (model:, task:, data:, ...), "
                             f"got {type(raw).__name__}")
    return raw


class ConfigSection:
    """Shared by the config sections: validation on construction, errors naming `prefix.key`."""

    prefix: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_type(f"{self.prefix}{f.name}", getattr(self, f.name),
                                              hints[f.name]))
        self.validate()

    def validate(self) -> None:
        pass

    def fail(self, key: str, what: str) -> None:
        raise DeltatuneError(f"{self.prefix}{key}: {what}")

    def positive(self, *keys: str, allow_none: bool = False) -> None:
        for key in keys:
            value = getattr(self, key)
            if value is None and allow_none:
                continue
            if value is None or value <= 0:
                self.fail(key, f"must be > 0, got {value!r}")

    def one_of(self, key: str, allowed: tuple[str, ...]) -> None:
        value = getattr(self, key)
        if value not in allowed:
            near = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            self.fail(key, f"must be one of {' | '.join(allowed)}, got {value!r}{hint}")


# ---------------------------------------------------------------------------------- types
def type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if typing.get_origin(hint) is list:
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(
            args[0], str(args[0]))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping"}.get(hint, str(hint))


def matches_type(value: Any, hint: Any) -> tuple[bool, Any]:
    """(does value fit hint, the value converted: ints become floats where floats are wanted)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, converted = matches_type(value, arg)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            return False, value
        converted = [matches_type(v, item) for v in value]
        return all(ok for ok, _ in converted), [v for _, v in converted]
    return isinstance(value, hint), value


def check_type(key: str, value: Any, hint: Any) -> Any:
    ok, converted = matches_type(value, hint)
    if not ok:
        raise DeltatuneError(f"{key}: expected {type_name(hint)}, got {value!r} "
                             f"({type(value).__name__})")
    return converted
