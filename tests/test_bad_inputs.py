"""The bad-input corpus (tests/bad_inputs/*.yaml): every case goes through the CLI and must end
with exit code 2, exactly one line on stderr that names what is wrong, no traceback, and the
workspace byte-for-byte as it was (nothing overwritten, nothing half-written left behind).

A case breaks one thing in a good workspace (see bad_inputs/workspace.py for what is in it):

    - name: data-label-out-of-range          # unique id
      argv: [train, run.yaml]                # run in the workspace root
      expect: "train.jsonl:line 3: label 7"  # a substring of the one stderr line (or a list)
      files: {data/train.jsonl: "..."}       # write text files (or {text: ..., encoding: latin-1}
                                             #   / {hex: "00ff..."} for raw bytes)
      set: {run.yaml: {train.lr: "fast"}}    # change keys of a YAML/JSON file (dotted paths)
      unset: {run.yaml: [model]}             # remove keys
      truncate: {adapter/adapter_model.safetensors: 200}   # keep the first N bytes
      delete: [adapter/adapter_config.json]
      subprocess: true                       # also run as a real `python -m deltatune.cli`
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deltatune.cli import main

CORPUS = Path(__file__).parent / "bad_inputs"
sys.path.insert(0, str(CORPUS))
from workspace import build_workspace  # noqa: E402

CASE_KEYS = {"name", "argv", "expect", "files", "set", "unset", "truncate", "delete", "subprocess"}


def load_cases() -> list[dict]:
    cases = []
    for table in sorted(CORPUS.glob("*.yaml")):
        for case in yaml.safe_load(table.read_text(encoding="utf-8")):
            unknown = set(case) - CASE_KEYS
            assert not unknown, f"{table.name}: {case.get('name')}: unknown keys {unknown}"
            case["table"] = table.stem
            cases.append(case)
    names = [c["name"] for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


CASES = load_cases()


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return build_workspace(tmp_path_factory.mktemp("bad-input-template"))


def _set_dotted(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _unset_dotted(tree: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree[part]
    del tree[last]


def _edit_structured(path: Path, edit) -> None:
    is_json = path.suffix == ".json"
    tree = json.loads(path.read_text()) if is_json else yaml.safe_load(path.read_text())
    edit(tree)
    path.write_text(json.dumps(tree, indent=2) if is_json else yaml.safe_dump(tree, sort_keys=False))


def prepare(case: dict, template: Path, root: Path) -> Path:
    """A copy of the template workspace with this case's one breakage applied."""
    shutil.copytree(template, root)
    for name, content in (case.get("files") or {}).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        elif "hex" in content:
            path.write_bytes(bytes.fromhex(content["hex"]))
        else:
            path.write_bytes(content["text"].encode(content["encoding"]))
    for name, values in (case.get("set") or {}).items():
        _edit_structured(root / name, lambda t: [_set_dotted(t, k, v) for k, v in values.items()])
    for name, keys in (case.get("unset") or {}).items():
        _edit_structured(root / name, lambda t: [_unset_dotted(t, k) for k in keys])
    for name, keep in (case.get("truncate") or {}).items():
        path = root / name
        path.write_bytes(path.read_bytes()[:keep])
    for name in case.get("delete") or []:
        path = root / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under root -> a digest of its content ("dir" for directories)."""
    tree = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        tree[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return tree


def check_one_line(case: dict, code: int, err: str) -> None:
    lines = err.strip("\n").split("\n")
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("deltatune: error: "), err
    expected = case["expect"] if isinstance(case["expect"], list) else [case["expect"]]
    for part in expected:
        assert part in lines[0], f"expected {part!r} in {lines[0]!r}"


def test_corpus_is_large_and_covers_every_kind_of_input():
    assert len(CASES) >= 40
    assert {c["table"] for c in CASES} == {"adapters", "cli", "configs", "data", "models"}
    assert sum(bool(c.get("subprocess")) for c in CASES) >= 3


def test_the_unbroken_workspace_works(template, tmp_path, monkeypatch, capsys):
    """The control: every command the cases break succeeds on the good workspace, so each
    case's error comes from its one breakage."""
    root = prepare({}, template, tmp_path / "ws")
    monkeypatch.chdir(root)
    for argv in (["train", "run.yaml"], ["train", "lm.yaml"], ["inspect", "adapter"],
                 ["inspect", "bert"], ["eval", "--model", "bert", "--adapter", "adapter",
                                       "--data", "data/dev.jsonl"],
                 ["merge", "--model", "bert", "--adapter", "adapter", "--out", "merged"],
                 ["generate", "hello", "--model", "llama", "--adapter", "llama_adapter",
                  "--max-new-tokens", "2"],
                 ["plan", "run.yaml"]):
        assert main(argv) == 0, (argv, capsys.readouterr().err)
    assert (root / "out" / "summary.json").is_file() and (root / "merged" / "config.json").is_file()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, template, tmp_path, monkeypatch, capsys):
    root = prepare(case, template, tmp_path / "ws")
    monkeypatch.chdir(root)
    before = snapshot(root)
    capsys.readouterr()
    code = main([str(a) for a in case["argv"]])
    check_one_line(case, code, capsys.readouterr().err)
    assert snapshot(root) == before, "the failed command changed the workspace"


SUBPROCESS_CASES = [c for c in CASES if c.get("subprocess")]


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[c["name"] for c in SUBPROCESS_CASES])
def test_real_process_prints_no_traceback(case, template, tmp_path):
    root = prepare(case, template, tmp_path / "ws")
    before = snapshot(root)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "deltatune.cli", *map(str, case["argv"])],
                            cwd=root, env=env, capture_output=True, text=True, timeout=300)
    check_one_line(case, result.returncode, result.stderr)
    assert snapshot(root) == before
