"""Every fenced code block in README.md and docs/**/*.md runs or is checked (tests/docs_examples.py):
python executed, yaml validated as a run config, deltatune command lines parsed by the real parser,
json parsed; a block that cannot run here says why in a `<!-- docs-test: skip — REASON -->` marker."""
from __future__ import annotations

import pytest

import docs_examples as docs

PAGES = docs.pages()
RESULTS: dict = {}


def _result(path):
    if path not in RESULTS:
        RESULTS[path] = docs.run_page(path)
    return RESULTS[path]


@pytest.mark.parametrize("path", PAGES, ids=[str(p.relative_to(docs.REPO)) for p in PAGES])
def test_page_examples(path):
    failures = _result(path).failures
    assert not failures, "\n".join(failures)


def test_summary(capsys):
    """Counts over every page; the python and yaml blocks are the ones that must really run."""
    results = [_result(path) for path in PAGES]
    totals, skipped, failures = docs.summarize(results)
    lines = [f"docs examples over {len(PAGES)} pages: " + ", ".join(
        f"{kind} {n}" for kind, n in sorted(totals.items()))]
    lines += [f"  skipped {kind} at {where}: {reason}" for where, kind, reason in skipped]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert totals.get("python", 0) > 0 and totals.get("yaml", 0) > 0 and totals.get("cli", 0) > 0, lines[0]
    assert all(reason for _, _, reason in skipped)
    assert not failures, f"{len(failures)} failing blocks, first: {failures[0]}"


def test_marker_and_cli_checks_catch_mistakes(tmp_path, monkeypatch):
    """The checks fail where they should: a typo'd CLI line, a bad yaml key, a reason-less skip."""
    monkeypatch.setattr(docs, "REPO", tmp_path)
    page = tmp_path / "page.md"
    page.write_text("\n".join([
        "```bash", "deltatune trian examples/x.yaml", "```", "",
        "```yaml", "train: {lrr: 3e-4}", "```", "",
        "<!-- docs-test: skip -->", "```python", "1/0", "```", "",
        "```console", "$ make test", "$ deltatune plan --help", "usage: ...", "```", "",
        "```yaml", "train: {lr: 3e-4}", "method: {r: 16}", "```", "",
        "```python", "x = 1", "```", "", "```python", "assert x == 1", "```", "",
    ]) + "\n")
    result = docs.run_page(page)
    assert len(result.failures) == 3, result.failures
    assert result.failures[0].startswith("page.md:2: deltatune trian"), result.failures[0]
    assert result.failures[1].startswith("page.md:5: yaml block") and "train.lrr" in result.failures[1]
    assert result.failures[2].startswith("page.md:9: docs-test skip needs a reason")
    assert result.counts == {"shell, not run": 1, "cli": 1, "yaml": 1, "python": 2}, result.counts
