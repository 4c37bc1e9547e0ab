"""A classification run whose labels are not 0..K-1 (or are numbered differently in the eval
file) is refused in one line naming the file, the row and the labels, unless num_labels or
data.label_names declares the set."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from test_compare import tiny_model_dir  # noqa: F401  (the fixture: a tiny BERT; any class count loads)

from deltatune.cli import main
from deltatune.data.dataset import Example
from deltatune.data.labels import check_label_set

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def run(tmp_path: Path, model_dir: Path, train: list[int], eval: list[int], capsys,
        **top) -> tuple[int, str]:
    for name, labels in (("train", train), ("dev", eval)):
        rows = [{"text": f"row {i} says {'good' if label % 2 else 'bad'}", "label": label}
                for i, label in enumerate(labels)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"model": str(model_dir), "task": "classification", **top,
              "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "dev.jsonl"),
                       "max_length": 16},
              "method": {"name": "lora", "r": 2},
              "train": {"max_steps": 1, "batch_size": 4, "bf16": False},
              "output_dir": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    code = main(["train", str(tmp_path / "c.yaml")])
    return code, capsys.readouterr().err.strip()


def test_typo_labels_1_and_7_are_refused(tmp_path, tiny_model_dir, capsys):
    code, err = run(tmp_path, tiny_model_dir, [1, 7, 1, 1, 7, 1], [1, 7], capsys)
    assert code == 2 and "\n" not in err
    assert f"{tmp_path / 'train.jsonl'}:line 2: label 7" in err
    assert "1 (4 rows), 7 (2 rows)" in err and "missing: 0, 2, 3, 4, 5, 6" in err
    assert "set num_labels: 8 (or data.label_names)" in err
    assert not (tmp_path / "run").exists()


def test_a_missing_label_is_refused(tmp_path, tiny_model_dir, capsys):
    code, err = run(tmp_path, tiny_model_dir, [0, 2, 0, 2], [0, 2], capsys)
    assert code == 2 and "\n" not in err
    assert "train.jsonl:line 2: label 2" in err and "missing: 1)" in err


def test_eval_file_numbering_labels_otherwise_is_refused(tmp_path, tiny_model_dir, capsys):
    """train 0/1, eval 1/2 (1-based): eval never uses 0 and uses 2."""
    code, err = run(tmp_path, tiny_model_dir, [0, 1, 0, 1], [1, 2, 2, 1], capsys)
    assert code == 2 and "\n" not in err
    assert f"{tmp_path / 'dev.jsonl'}:line 2: label 2 is outside the label set 0..1" in err
    assert "this file never uses 0" in err
    assert "train labels: 0 (2 rows), 1 (2 rows); eval labels: 1 (2 rows), 2 (2 rows)" in err
    # an eval file that simply lacks a class (a small eval subset) is fine
    code, err = run(tmp_path, tiny_model_dir, [0, 1, 2, 1], [0, 1], capsys)
    assert code == 0, err


def test_num_labels_declares_a_sparse_set(tmp_path, tiny_model_dir, capsys):
    code, err = run(tmp_path, tiny_model_dir, [1, 7, 1, 7], [7, 1], capsys, num_labels=8)
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 1


def test_only_eval_uses_a_label_the_train_file_lacks():
    """The same rule without a model: train {0} (2 classes), eval {1}."""
    def dataset(labels, source):
        return SimpleNamespace(examples=[Example([1], label) for label in labels], source=source,
                               label_names=None, label_rows={l: f"{source}:line {i + 1}"
                                                             for i, l in reversed(list(enumerate(labels)))})
    with pytest.raises(Exception, match=r"^e:line 1: label 1 never occurs in t, while this file "
                                        r"never uses 0"):
        check_label_set(dataset([0, 0], "t"), dataset([1], "e"))
    check_label_set(dataset([0, 0], "t"), dataset([0, 1], "e"))  # eval adds a class train lacks


@pytest.mark.parametrize("task", ["sst2", "mrpc", "rte", "rt-polarity", "ag_news"])
def test_the_shared_classification_files_pass(task):
    files = sorted((SHARED / task).glob("*.jsonl"))
    def dataset(path):
        labels = [json.loads(line)["label"] for line in path.read_text().splitlines() if line]
        return SimpleNamespace(examples=[Example([1], label) for label in labels], source=str(path),
                               label_names=None)
    datasets = {p.stem: dataset(p) for p in files}
    train = datasets.get("train") or datasets["test"]
    for other in datasets.values():
        check_label_set(train, other)
    assert len(Counter(e.labels for e in train.examples)) >= 2
