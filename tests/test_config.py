"""Run configuration: YAML + key=value overrides -> validated dataclasses, one-line errors."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from deltatune.config.run import (DataConfig, RunConfig, TrainConfig, load_run_config, parse_scalar,
                              save_run_config)
from deltatune.errors import DeltatuneError
from deltatune.methods import method_config_for
from deltatune.methods.full import FullConfig
from deltatune.methods.lora import LoraConfig

BASE = {
    "model": "minilm",
    "task": "classification",
    "data": {"train": "data/train.jsonl", "eval": "data/dev.jsonl", "max_length": 64},
    "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "value"]},
    "train": {"epochs": 1, "batch_size": 32, "lr": 5.0e-4, "schedule": "linear"},
    "output_dir": "runs/sst2",
}


def write_config(directory: Path, values: dict | None = None, text: str | None = None) -> Path:
    path = directory / "run.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(values or BASE), encoding="utf-8")
    return path


def edited(**sections) -> dict:
    """BASE with some keys replaced: edited(train={"lr": 1}) merges into BASE["train"]."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key].update(value)
        else:
            values[key] = value
    return values


def test_file_is_read_into_typed_dataclasses(tmp_path):
    config = load_run_config(write_config(tmp_path))
    assert isinstance(config, RunConfig)
    assert isinstance(config.data, DataConfig) and isinstance(config.train, TrainConfig)
    assert config.train.lr == 5e-4 and config.train.epochs == 1.0
    assert config.train.warmup_ratio == 0.06  # defaults fill what the file leaves out
    assert config.data.max_length == 64 and config.data.format == "classification"
    method = method_config_for(config)
    assert isinstance(method, LoraConfig) and method.r == 8


def test_overrides_reach_any_key_with_yaml_types(tmp_path):
    config = load_run_config(write_config(tmp_path), [
        "method.r=16", "train.lr=3e-4", "output_dir=runs/x", "train.max_steps=50",
        "method.target_modules=[query, key, value]", "data.max_train_rows=100",
        "train.bf16=false", "train.max_grad_norm=", "data.label_names=[neg, pos]"])
    assert config.method["r"] == 16 and method_config_for(config).r == 16
    assert config.train.lr == pytest.approx(3e-4) and isinstance(config.train.lr, float)
    assert config.output_dir == "runs/x"
    assert config.train.max_steps == 50 and config.data.max_train_rows == 100
    assert method_config_for(config).target_modules == ["query", "key", "value"]
    assert config.train.bf16 is False and config.train.max_grad_norm is None
    assert config.num_labels == 2  # from the label names


def test_scalars_parse_like_yaml_including_bare_exponents():
    assert parse_scalar("3e-4") == pytest.approx(3e-4)
    assert parse_scalar("1E5") == 1e5 and isinstance(parse_scalar("1E5"), float)
    assert parse_scalar("16") == 16 and parse_scalar("true") is True
    assert parse_scalar("runs/x") == "runs/x" and parse_scalar("") is None
    assert parse_scalar("[a, b]") == ["a", "b"]
    assert parse_scalar("a: b: c") == "a: b: c"  # not valid YAML: kept as text


def test_changing_method_name_on_the_command_line_starts_that_method_fresh(tmp_path):
    path = write_config(tmp_path)
    config = load_run_config(path, ["method.name=full"])
    assert config.method == {"name": "full"} and isinstance(method_config_for(config), FullConfig)
    config = load_run_config(path, ["method.name=lora", "method.r=4"])  # same method: kept
    assert config.method["alpha"] == 16 and config.method["r"] == 4


@pytest.mark.parametrize("values, overrides, message", [
    (edited(train={"lr_rate": 1e-3}), [],
     "train.lr_rate: unknown key (did you mean 'train.lr'?)"),
    (BASE, ["train.lr_rate=1e-3"], "train.lr_rate: unknown key (did you mean 'train.lr'?) [command line]"),
    (BASE, ["trian.lr=1e-3"], "trian.lr: unknown key (did you mean 'train.lr'?) [command line]"),
    (edited(data={"max_lenght": 32}), [], "data.max_lenght: unknown key (did you mean 'data.max_length'?)"),
    (edited(outputdir="x"), [], "outputdir: unknown key (did you mean 'output_dir'?)"),
    (BASE, ["method.rr=4"], "method.rr: unknown option for method 'lora' (did you mean 'r'?)"),
    (BASE, ["train.batch_size=abc"], "train.batch_size: expected an integer, got 'abc' (str)"),
    (BASE, ["train.batch_size=2.5"], "train.batch_size: expected an integer, got 2.5 (float)"),
    (BASE, ["train.lr=fast"], "train.lr: expected a number or null, got 'fast' (str)"),
    (BASE, ["data.packing=3"], "data.packing: expected true/false, got 3 (int)"),
    (BASE, ["data.label_names=pos"], "data.label_names: expected a list of strings or null, got 'pos' (str)"),
    (BASE, ["train.batch_size=0"], "train.batch_size: must be > 0, got 0"),
    (BASE, ["train.grad_accum=-1"], "train.grad_accum: must be > 0, got -1"),
    (BASE, ["train.schedule=cosin"],
     "train.schedule: must be one of linear | cosine | constant, got 'cosin' (did you mean 'cosine'?)"),
    (BASE, ["train.warmup_ratio=1.5"], "train.warmup_ratio: must be in [0, 1), got 1.5"),
    (BASE, ["train.on_nan=ignore"], "train.on_nan: must be one of stop | skip"),
    (BASE, ["train.bf16=maybe"], "train.bf16: must be true, false or auto, got 'maybe'"),
    (BASE, ["data.max_length=0"], "data.max_length: must be > 0, got 0"),
    (BASE, ["data.format=xml"], "data.format: must be one of classification | pairs | alpaca"),
    (BASE, ["task=clasification"], "task: must be one of classification | causal-lm, got "
                                   "'clasification' (did you mean 'classification'?)"),
    (BASE, ["data.format=alpaca"], "data.format: 'alpaca' does not fit task 'classification'"),
    (BASE, ["data.packing=true"], "data.packing: only causal-lm data can be packed"),
    (BASE, ["num_labels=3", "data.label_names=[a, b]"], "num_labels: 3 disagrees with data.label_names"),
    (BASE, ["data.label_names=[a, a]"], "data.label_names: has duplicates"),
    (BASE, ["data=3"], "data: expected a mapping of keys, got 3 [command line]"),
    (BASE, ["train.lr.x=1"], "train.lr: is not a section, cannot set train.lr.x"),
    (BASE, ["lr"], "override 'lr': expected key=value"),
    (BASE, ["method.name=lorax"], "unknown method 'lorax'"),
    ({k: v for k, v in BASE.items() if k != "model"}, [], "model: missing"),
    ({k: v for k, v in BASE.items() if k != "method"}, [], "method: missing"),
    (edited(data={"train": None, "eval": None}), [], "data.train: missing"),
])
def test_bad_values_are_one_line_errors_naming_the_key(tmp_path, values, overrides, message):
    with pytest.raises(DeltatuneError) as info:  # the method's options too, as `deltatune train` checks
        method_config_for(load_run_config(write_config(tmp_path, values), overrides))
    text = str(info.value)
    assert message in text, text
    assert "\n" not in text


def test_missing_file_and_yaml_syntax_errors_name_file_and_line(tmp_path):
    with pytest.raises(DeltatuneError, match=r"nope\.yaml: config file not found"):
        load_run_config(tmp_path / "nope.yaml")
    path = write_config(tmp_path, text="model: minilm\ntask: classification\ndata:\n  train: [a\n"
                                       "method: {name: lora}\n")
    with pytest.raises(DeltatuneError) as info:
        load_run_config(path)
    assert f"{path}:5: YAML syntax error" in str(info.value)
    path = write_config(tmp_path, text="- just\n- a list\n")
    with pytest.raises(DeltatuneError, match="expected a mapping of keys"):
        load_run_config(path)


def test_pairs_default_to_text_a_and_text_b():
    assert (DataConfig(format="pairs").text_field, DataConfig(format="pairs").text_pair_field) == \
        ("text_a", "text_b")
    custom = DataConfig(format="pairs", text_field="premise", text_pair_field="hypothesis")
    assert (custom.text_field, custom.text_pair_field) == ("premise", "hypothesis")
    assert DataConfig().text_pair_field is None  # single sentences stay single


def test_relative_data_paths_resolve_against_the_config_directory(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    monkeypatch.chdir("/")
    config = load_run_config(write_config(tmp_path))
    assert config.data.train == str(tmp_path / "data" / "train.jsonl")
    assert config.data.eval == str(tmp_path / "data" / "dev.jsonl")  # missing: still beside it
    config = load_run_config(write_config(tmp_path), ["data.train=hf:stanfordnlp/sst2"])
    assert config.data.train == "hf:stanfordnlp/sst2"  # Hub names are not paths


def test_shared_data_paths_follow_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_DATA", "/elsewhere/data")
    config = load_run_config(write_config(tmp_path), [
        "data.train=../shared/data/sst2/train.jsonl", "data.eval=$DELTATUNE_DATA/sst2/dev.jsonl"])
    assert config.data.train == "/elsewhere/data/sst2/train.jsonl"
    assert config.data.eval == "/elsewhere/data/sst2/dev.jsonl"
    monkeypatch.delenv("DELTATUNE_DATA")
    with pytest.raises(DeltatuneError, match=r"DELTATUNE_DATA is not set"):
        load_run_config(write_config(tmp_path), ["data.eval=$DELTATUNE_DATA/sst2/dev.jsonl"])


def test_saved_config_loads_back_identical_and_atomically(tmp_path):
    config = load_run_config(write_config(tmp_path), ["method.r=4", "train.lr=1e-3"])
    out = tmp_path / "run" / "config.yaml"
    save_run_config(config, out)
    assert sorted(os.listdir(out.parent)) == ["config.yaml"]  # no temp file left behind
    again = load_run_config(out)
    assert again == config
    assert yaml.safe_load(out.read_text())["train"]["lr"] == pytest.approx(1e-3)
