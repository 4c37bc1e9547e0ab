"""Every fenced code block in README.md and docs/**/*.md runs or is checked (tests/docs_examples.py):
python executed, yaml validated as a run config, deltatune command lines parsed by the real parser,
json parsed; a block that cannot run here says why in a `<!-- docs-test: skip — REASON -->` marker."""
from __future__ import annotations

import sys

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
        "```yaml", "method: {name: lora, rank: 16}", "```", "",
        "```python", "x = 1", "```", "", "```python", "assert x == 1", "```", "",
    ]) + "\n")
    result = docs.run_page(page)
    assert len(result.failures) == 4, result.failures
    assert result.failures[0].startswith("page.md:2: deltatune trian"), result.failures[0]
    assert result.failures[1].startswith("page.md:5: yaml block") and "train.lrr" in result.failures[1]
    assert result.failures[2].startswith("page.md:9: docs-test skip needs a reason")
    assert result.failures[3].startswith("page.md:25: yaml block") and "method.rank" in result.failures[3]
    assert result.counts == {"shell, not run": 1, "cli": 1, "yaml": 1, "python": 2}, result.counts


def _reference_hook():
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_reference_hook", docs.REPO / "docs/hooks/reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_generated_reference_covers_the_code():
    """docs/reference/config.md and cli.md are generated at build time: every config key, every
    method's options, every subcommand and option appear, with the field comments as descriptions."""
    import dataclasses

    from deltatune.cli import build_parser
    from deltatune.config.run import DataConfig, TrainConfig
    from deltatune.methods import REGISTRY

    hook = _reference_hook()
    config_page = hook.config_reference()
    for prefix, cls in (("data.", DataConfig), ("train.", TrainConfig)):
        for f in dataclasses.fields(cls):
            assert f"<code>{prefix}{f.name}</code>" in config_page, f"{prefix}{f.name} missing from the config reference"
    for name, method in REGISTRY.items():
        assert f"### `{name}`" in config_page
        for f in dataclasses.fields(method.config):
            assert f"<code>method.{f.name}</code>" in config_page
    assert "ignored when max_steps is set" in config_page  # a field's comment is its description
    cli_page = hook.cli_reference()
    parser = build_parser()
    for name, _, sub in hook._subcommands(parser):
        assert f"## `deltatune {name}`" in cli_page
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in cli_page, f"deltatune {name} {option} missing from the CLI reference"


def test_reference_source_pages_are_replaced_by_the_generated_ones():
    """The repository's docs/reference/{config,cli}.md are notes (so README's links resolve there);
    the built page is the generated reference in their place."""
    from types import SimpleNamespace

    hook = _reference_hook()
    for path, make in hook.GENERATED.items():
        note = (docs.REPO / "docs" / path).read_text(encoding="utf-8")
        assert "generated from the code at every docs build (`make docs`" in note, path
        page = SimpleNamespace(file=SimpleNamespace(src_uri=path))
        assert hook.on_page_markdown(note, page, {"docs_dir": str(docs.REPO / "docs")}, None) == make()


def test_python_blocks_share_a_module_namespace(tmp_path, monkeypatch):
    monkeypatch.setattr(docs, "REPO", tmp_path)
    page = tmp_path / "page.md"
    page.write_text("```python\nfrom dataclasses import dataclass\n\n@dataclass\nclass Row:\n    text: str\n```\n\n"
                    "```python\nassert Row('a').text == 'a'\nimport os\nassert os.environ['HF_HUB_OFFLINE'] == '1'\n```\n")
    result = docs.run_page(page)
    assert result.failures == [] and result.counts == {"python": 2}, result
