"""`deltatune compare` as a new user meets it: a config without `method:`, live progress from
each child run, and a failing child's one-line error."""
from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import yaml
from test_compare import SST2, tiny_model_dir  # noqa: F401  (the fixture)

from deltatune.cli import main
from deltatune.compare.live import TAIL_CHARS, last_line, run_relayed


def config_without_method(tmp_path: Path, model_dir: Path, compare: dict | None) -> Path:
    config = {
        "model": str(model_dir), "task": "classification",
        "data": {"train": str(SST2 / "train.jsonl"), "eval": str(SST2 / "dev.jsonl"),
                 "max_length": 32, "max_train_rows": 32, "max_eval_rows": 16},
        "train": {"epochs": 1, "batch_size": 16, "bf16": False, "log_every": 1},
        "output_dir": str(tmp_path / "cmp"),
    }
    if compare is not None:
        config["compare"] = compare
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_no_method_section_with_methods_flag_and_live_progress(tmp_path, tiny_model_dir,
                                                               capsys, monkeypatch):
    monkeypatch.setenv("DELTATUNE_PROGRESS", "1")  # the child's bar, although stderr is a pipe
    config = config_without_method(tmp_path, tiny_model_dir, compare=None)
    assert main(["plan", str(config), "--methods", "lora"]) == 0
    assert main(["compare", str(config), "--methods", "lora"]) == 0
    rows = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert [r["method"] for r in rows] == ["lora"] and "error" not in rows[0]
    captured = capsys.readouterr()
    assert "run 1 of 1: lora" in captured.out and "lora seed 0: done" in captured.out
    # the child's tqdm bar went through our stderr (relayed, not printed by this process)
    assert "2/2" in captured.err and "step" in captured.err


def test_no_method_section_with_compare_section_and_failing_child(tmp_path, tiny_model_dir,
                                                                  capsys):
    """lora trains; adapter's child fails on its eval file: one line with the file, and the
    comparison goes on (an ETA measured on lora is printed after it)."""
    missing = tmp_path / "nowhere" / "dev.jsonl"
    config = config_without_method(tmp_path, tiny_model_dir, compare={
        "methods": ["lora", "adapter"],
        "per_method": {"adapter": {"data": {"eval": str(missing)}}}})
    assert main(["compare", str(config)]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "cmp" / "results.json").read_text())}
    assert "error" not in rows["lora"]
    error = rows["adapter"]["error"]
    assert str(missing) in error and "\n" not in error and error.startswith("deltatune: error:")
    captured = capsys.readouterr()
    assert "run 2 of 2: adapter" in captured.out
    assert re.search(r"run 2 of 2: adapter seed 0; ETA \d+ s", captured.out)  # measured on lora
    assert f"adapter seed 0: failed: {error}" in captured.out
    assert error in captured.err  # the child's stderr reached ours live


def test_relay_streams_everything_and_keeps_the_tail(tmp_path):
    script = ("import sys\n"
              "for i in range(500): sys.stderr.write(f'\\r progress {i:04d} ' + 'x' * 20)\n"
              "sys.stderr.write('\\nlast words: data.eval missing\\n'); sys.exit(3)\n")
    out = io.StringIO()
    code, tail = run_relayed([sys.executable, "-c", script], out=out)
    assert code == 3
    assert "progress 0000" in out.getvalue() and "progress 0499" in out.getvalue()
    assert len(tail) == TAIL_CHARS and out.getvalue().endswith(tail)
    assert last_line(tail, code) == "last words: data.eval missing"
    assert last_line("", 7) == "exit code 7"


def test_plan_finds_four_classes_in_the_data_as_training_does(tmp_path, tiny_model_dir, capsys):
    """AG News labels 0..3 with no num_labels: plan used to assume 2 classes and stop on label 2."""
    config = yaml.safe_load(config_without_method(tmp_path, tiny_model_dir, None).read_text())
    config["data"].update({"train": str(SST2.parent / "ag_news" / "test.jsonl"), "eval": None,
                           "max_train_rows": 200})
    path = tmp_path / "agnews.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["plan", str(path), "--methods", "lora"]) == 0
    assert "lora" in capsys.readouterr().out
    from deltatune.config.run import DataConfig
    from deltatune.data.dataset import classes_of_training_file

    assert classes_of_training_file(DataConfig(train=config["data"]["train"])) == 4
    assert classes_of_training_file(DataConfig(train=str(SST2 / "train.jsonl"))) == 2
