"""Read data rows from JSONL / JSON / CSV / TSV / parquet / plain-text files or a Hub dataset.

Plain readers (json, csv, pyarrow) rather than `datasets.load_dataset` for local files: every
error must name the file and the 1-based line of the bad row, which the datasets loaders do not
report, and they would also copy each file into an Arrow cache. `datasets` is used for Hub names
(`hf:NAME[:CONFIG][@SPLIT]`), where it is the only reader.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from deltatune.errors import DeltatuneError

HUB_PREFIX = "hf:"
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
TEXT_SUFFIXES = (".txt",)


@dataclass
class Row:
    """One data row and where it came from, for error messages ("file:line 12")."""

    values: dict[str, Any]
    where: str

    def get(self, name: str) -> Any:
        value = self.values.get(name)
        if value is None:
            fields = ", ".join(str(k) for k in self.values if k is not None) or "none"
            raise self.error(f"missing field {name!r} (fields here: {fields})")
        return value

    def text(self, name: str) -> str:
        value = self.get(name)
        if not isinstance(value, str):
            raise self.error(f"field {name!r} must be a string, got {value!r} "
                             f"({type(value).__name__})")
        return value

    def error(self, what: str) -> DeltatuneError:
        return DeltatuneError(f"{self.where}: {what}")


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # tolerate a byte-order mark (Excel writes one)
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DeltatuneError(f"{path}:line {line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} "
                             f"at offset {exc.start}); save the file as UTF-8") from None


def _jsonl_rows(path: Path, text: str) -> Iterator[Row]:
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            values = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DeltatuneError(f"{path}:line {number}: not valid JSON ({exc.msg} at column "
                                 f"{exc.colno})") from None
        if not isinstance(values, dict):
            raise DeltatuneError(f"{path}:line {number}: expected a JSON object {{...}}, got "
                                 f"{type(values).__name__}")
        yield Row(values, f"{path}:line {number}")


def _json_rows(path: Path, text: str) -> Iterator[Row]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line under a .json name
            yield from _jsonl_rows(path, text)
            return
        raise DeltatuneError(f"{path}:line {exc.lineno}: not valid JSON ({exc.msg} at column "
                             f"{exc.colno})") from None
    if isinstance(values, dict):
        yield Row(values, f"{path}:item 1")
        return
    if not isinstance(values, list):
        raise DeltatuneError(f"{path}: expected a JSON list of objects, got {type(values).__name__}")
    for number, item in enumerate(values, start=1):
        if not isinstance(item, dict):
            raise DeltatuneError(f"{path}:item {number}: expected a JSON object, got "
                                 f"{type(item).__name__}")
        yield Row(item, f"{path}:item {number}")


def _csv_rows(path: Path, text: str, delimiter: str) -> Iterator[Row]:
    # GLUE-style TSVs contain bare quotes inside sentences: no quoting for TSV.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        for values in reader:
            if not any(v for k, v in values.items() if k is not None):
                continue  # a blank line
            yield Row(values, f"{path}:line {reader.line_num}")
    except csv.Error as exc:
        raise DeltatuneError(f"{path}:line {reader.line_num}: bad CSV ({exc})") from None


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DeltatuneError(f"{path}: not a readable parquet file ({type(exc).__name__})") from None
    for number, values in enumerate(table.to_pylist(), start=1):
        yield Row(values, f"{path}:row {number}")


def _hub_rows(name: str, split: str) -> Iterator[Row]:
    spec = name[len(HUB_PREFIX):]
    spec, _, split_override = spec.partition("@")
    dataset_name, _, config_name = spec.partition(":")
    split = split_override or split
    try:
        import datasets

        dataset = datasets.load_dataset(dataset_name, config_name or None, split=split)
    except Exception as exc:  # offline, unknown name, unknown split: all say the same to a user
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise DeltatuneError(f"{name}: cannot load the Hub dataset {dataset_name!r} split "
                             f"{split!r} ({type(exc).__name__}: {reason}) — offline? use a local "
                             f"file instead") from None
    for number, values in enumerate(dataset, start=1):
        yield Row(dict(values), f"{name}:row {number}")


def read_rows(source: str, split: str, text_field: str = "text",
              whole_text: bool = False, limit: int | None = None) -> list[Row]:
    """The first `limit` rows of a data source.

    `whole_text`: plain-text formats accept a .txt file, read as a single row {text_field: text}.
    `split` picks the Hub split (train -> "train", eval -> "validation") unless the name has @SPLIT.
    """
    if source.startswith(HUB_PREFIX):
        rows_iter = _hub_rows(source, "train" if split == "train" else "validation")
    else:
        path = Path(source)
        if not path.exists():
            raise DeltatuneError(f"{source}: data file not found")
        if path.is_dir():
            raise DeltatuneError(f"{source}: is a directory, expected a data file")
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES and whole_text:
            rows_iter = iter([Row({text_field: _decode(path)}, f"{path}")])
        elif suffix == ".jsonl":
            rows_iter = _jsonl_rows(path, _decode(path))
        elif suffix == ".json":
            rows_iter = _json_rows(path, _decode(path))
        elif suffix in (".csv", ".tsv"):
            rows_iter = _csv_rows(path, _decode(path), "\t" if suffix == ".tsv" else ",")
        elif suffix == ".parquet":
            rows_iter = _parquet_rows(path)
        else:
            allowed = ", ".join(TABLE_SUFFIXES + (TEXT_SUFFIXES if whole_text else ()))
            raise DeltatuneError(f"{source}: unknown data file type {suffix or '(none)'!r} "
                                 f"(use {allowed})")
    rows = []
    for row in rows_iter:
        if limit is not None and len(rows) >= limit:
            break
        rows.append(row)
    if not rows:
        raise DeltatuneError(f"{source}: no rows (empty dataset)")
    return rows
