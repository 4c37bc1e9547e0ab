"""`deltatune compare` and `plan` end to end on a tiny model: every output file, every method."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import tiny_bert

from deltatune.cli import main
from deltatune.methods import method_names
from deltatune.models import resolve_model_path

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random BERT with MiniLM's tokenizer, saved as a transformers directory."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    directory = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        vocab_size=tokenizer.vocab_size, max_position_embeddings=128)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_config(tmp_path: Path, model_dir: Path, methods: list[str]) -> Path:
    config = {
        "model": str(model_dir), "task": "classification",
        "data": {"train": str(SST2 / "train.jsonl"), "eval": str(SST2 / "dev.jsonl"),
                 "max_length": 32, "max_train_rows": 48, "max_eval_rows": 32},
        "train": {"epochs": 1, "batch_size": 16, "bf16": False},
        "output_dir": str(tmp_path / "cmp"),
        "compare": {"methods": methods, "per_method": {"lora": {"method": {"r": 4}}},
                    "workers": 2},  # two runs at a time: most of a tiny run is process start-up
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# One method of each kind of delta (full, a low-rank weight delta and its variant, a rotation,
# virtual tokens, a reparametrised prefix, scaling vectors, norms only): each run is its own
# process, so every method of the registry would cost minutes; tests/test_conformance.py holds
# every method to the training, saving and merging contract, and test_plan_predicts_every_method
# below plans each of them.
COMPARED = ["full", "lora", "dora", "oft", "prompt", "prefix-lstm", "ia3", "ln-tuning"]


def test_compare_writes_table_json_csv_plot_for_each_kind_of_method(tmp_path, tiny_model_dir, capsys):
    methods = COMPARED
    assert set(methods) <= set(method_names())
    config = write_config(tmp_path, tiny_model_dir, methods)
    assert main(["compare", str(config)]) == 0
    out = tmp_path / "cmp"
    rows = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in rows] == methods
    for row in rows:
        assert "error" not in row, row
        assert 0.0 <= row["score"] <= 1.0 and row["trainable_params"] > 0
        assert row["peak_memory_mb"] > 0 and row["planned_peak_mb"] > 0 and row["saved_mb"] > 0
    by_method = {r["method"]: r for r in rows}
    assert by_method["lora"]["trainable_params"] < by_method["full"]["trainable_params"]
    assert by_method["lora"]["saved_mb"] < by_method["full"]["saved_mb"]
    csv_text = (out / "results.csv").read_text()
    report = (out / "report.md").read_text()
    for name in methods:
        assert f"\n{name}," in csv_text or csv_text.count(name) >= 1
        assert f"| {name} |" in report
    assert "does not apply to an encoder" in report
    png = (out / "tradeoffs.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    printed = capsys.readouterr().out
    assert all(name in printed for name in methods)
    # run again: every finished run is reused (same settings), nothing retrains
    assert main(["compare", str(config)]) == 0
    assert capsys.readouterr().out.count("reused: finished earlier") == len(methods)
    # a directory that is not a comparison is not overwritten without --overwrite
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    assert main(["compare", str(config), f"output_dir={tmp_path / 'other'}"]) == 2


def test_plan_predicts_every_method(tmp_path, tiny_model_dir, capsys):
    methods = method_names()  # every method and every named variant (dora, prefix-lstm)
    config = write_config(tmp_path, tiny_model_dir, methods)
    assert main(["plan", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "peak MB" in printed
    rows = {line.split()[0]: line.split()[1] for line in printed.splitlines() if line.split()
            and line.split()[0] in methods}
    assert set(rows) == set(methods)
    trainable = {name: int(count.replace(",", "")) for name, count in rows.items()}
    assert all(count > 0 for count in trainable.values()), trainable
    # a variant gets its own row, with its own (larger) trainable count
    assert trainable["dora"] > trainable["lora"] and trainable["full"] > trainable["lora"]


def test_compare_rejects_unknown_method(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir, ["lora", "dorra"])
    assert main(["compare", str(config)]) == 2
    assert "compare.methods: unknown method 'dorra'" in capsys.readouterr().err
