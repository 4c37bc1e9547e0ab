"""benchmarks/RESULTS.md is generated in full by `make report` (benchmarks/common/report.py) from
the committed raw results and prose, and every table in it says when, on which CPU, in which
precision and by which command it was measured."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from test_repository_words import WORDS

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _report():
    spec = importlib.util.spec_from_file_location("benchmarks_report", BENCHMARKS / "common" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regenerating_gives_the_committed_results(tmp_path):
    out = tmp_path / "RESULTS.md"
    _report().main(["--out", str(out)])
    assert out.read_text() == (BENCHMARKS / "RESULTS.md").read_text(), \
        "benchmarks/RESULTS.md is stale: run `make report` and commit it"


def test_every_table_states_date_cpu_flags_precision_and_command():
    report = _report()
    lines = (BENCHMARKS / "RESULTS.md").read_text().splitlines()
    tables = 0
    for i, line in enumerate(lines):
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            tables += 1
            above = [x for x in lines[:i] if x.strip()][-1]
            assert report.CAPTION.match(above), f"table at line {i + 1} has no caption: {above!r}"
    assert tables >= 20


def test_no_history_or_workplace_words():
    text = "\n".join(p.read_text() for p in BENCHMARKS.rglob("*") if p.is_file() and p.suffix in (".md", ".py"))
    assert not WORDS.search(text.encode())  # the repository-wide list of such words
    results = (BENCHMARKS / "RESULTS.md").read_text()
    assert not re.search(r"\b\d{2}:\d{2}(-\d{2}:\d{2})? UTC|load average|\bholds?\b.*\block\b", results)
