"""`train.report_to`: runs and comparisons read back from MLflow (its SQLite store, through
`mlflow.MlflowClient`) and from a W&B offline run directory, against the run's own files.

Every store lives in tmp_path: the tracking URI, W&B's directories and the working directory
are pointed there, so nothing is written to the home directory or the repository.
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
import yaml

import deltatune as dt
from deltatune.cli import main
from deltatune.training.loop import train_from_config
from deltatune.training.run_dir import partial_dir
from fault_driver import kill_at
from tiny_runs import classification_config, one_thread, tiny_bert_dir  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def stores(tmp_path, monkeypatch):
    """No tracker setting leaks in from the caller; W&B offline, its files under tmp_path."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "WANDB_PROJECT",
                "WANDB_RUN_GROUP", "WANDB_DIR", "DELTATUNE_MLFLOW_PARENT_RUN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home" / key.lower()))
    monkeypatch.chdir(tmp_path)  # anything written "here" by mistake lands in tmp_path
    # child processes import this deltatune, whatever the working directory
    monkeypatch.setenv("PYTHONPATH", str(Path(dt.__file__).resolve().parents[1]))
    return tmp_path


def client_for(runs: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")


def all_runs(client) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def series(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def flat(values, prefix=""):
    if isinstance(values, dict) and values:
        out = {}
        for key, value in values.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: str(values)}


def logits(model_dir: Path, adapter: Path) -> torch.Tensor:
    model, _ = dt.load_model(str(model_dir), task="classification")
    dt.load_adapter(model, adapter)
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([[5, 60, 70, 80, 90, 6]])).logits


def test_mlflow_run_reads_back_as_the_run_files_say(stores):
    from deltatune.ui.runs import run_detail

    model_dir = tiny_bert_dir(stores)
    config = classification_config(stores / "cfg", model_dir, max_steps=2, report_to=["mlflow"])
    summary = train_from_config(str(config))
    out, runs = Path(summary["output_dir"]), Path(summary["output_dir"]).parent
    client = client_for(runs)
    (run,) = all_runs(client)
    assert run.info.status == "FINISHED"
    assert run.data.tags["method"] == "lora" and run.data.tags["base_model"] == str(model_dir)
    # params: the flattened config.yaml the run directory keeps
    assert run.data.params == flat(yaml.safe_load((out / "config.yaml").read_text()))
    logged = records(out)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_mb", "eval_accuracy"):
        assert series(client, run.info.run_id, key) == [(r["step"], r[key]) for r in logged if key in r]
    assert [s for s, _ in series(client, run.info.run_id, "loss")] == [1, 2]
    assert run.data.metrics["summary.trainable_params"] == summary["trainable_params"]
    assert run.data.metrics["summary.final_eval.accuracy"] == summary["final_eval"]["accuracy"]
    # the adapter artifact is the delta: it loads and gives the run's own logits
    adapter = Path(client.download_artifacts(run.info.run_id, "adapter", str(stores / "download")))
    assert (adapter / "adapter_model.safetensors").is_file()
    assert torch.equal(logits(model_dir, adapter), logits(model_dir, out))
    # artifacts beside the database, nothing under the working directory
    assert (runs / "mlartifacts" / run.info.run_id).is_dir()
    assert not (stores / "mlruns").exists() and not (stores / "mlartifacts").exists()
    # the web page links the run to its MLflow run
    link = run_detail(runs, "out")["tracking"]["mlflow"]
    assert link["run_id"] == run.info.run_id and link["url"].endswith(f"/runs/{run.info.run_id}")


def test_killed_and_resumed_run_is_one_mlflow_run_with_every_step_once(stores):
    model_dir = tiny_bert_dir(stores)
    config = classification_config(stores / "cfg", model_dir, max_steps=6, report_to=["mlflow"])
    out = stores / "cfg" / "runs" / "killed"
    extra = ["train.save_every=2", "method.dropout=0.1"]
    # SIGKILL halfway through writing checkpoint 4: steps 3 and 4 were sent to MLflow, and the
    # resume trains them again from checkpoint 2
    kill_at(config, out, "in-weights", 4, stores, extra)
    client = client_for(out.parent)
    (killed,) = all_runs(client)
    assert killed.info.status == "RUNNING"
    assert [s for s, _ in series(client, killed.info.run_id, "loss")] == [1, 2, 3, 4]
    assert main(["train", str(config), f"output_dir={out}", *extra, "--resume"]) == 0
    (run,) = all_runs(client)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    logged = records(out)
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 7))
    assert series(client, run.info.run_id, "loss") == [(r["step"], r["loss"]) for r in logged if "loss" in r]
    assert not partial_dir(out).exists()


def test_compare_is_one_parent_run_with_a_child_per_method(stores):
    from deltatune.ui.runs import comparison_detail

    model_dir = tiny_bert_dir(stores)
    config = classification_config(stores / "cfg", model_dir, max_steps=2, report_to=["mlflow"])
    values = yaml.safe_load(config.read_text())
    values["compare"] = {"methods": ["lora", "ia3"]}
    values["output_dir"] = str(stores / "cfg" / "runs" / "cmp")
    config.write_text(yaml.safe_dump(values))
    assert main(["compare", str(config)]) == 0
    out = stores / "cfg" / "runs" / "cmp"
    rows = json.loads((out / "results.json").read_text())
    client = client_for(out.parent)
    found = all_runs(client)
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    (parent,) = parents
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(found) == 3 and sorted(c.data.tags["method"] for c in children) == ["ia3", "lora"]
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children)
    expected = {f"{row['method']}/{key}": float(value) for row in rows for key, value in row.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)}
    assert expected and parent.data.metrics == expected
    # the parent names the comparison's Optuna study, so the two can be found from each other
    assert parent.data.tags["optuna_storage"] == f"sqlite:///{(out / 'study.db').resolve()}"
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "results.json", "results.csv", "tradeoffs.png"} <= names
    assert comparison_detail(out.parent, "cmp")["tracking"]["mlflow"]["run_id"] == parent.info.run_id
    for child in children:  # each child's numbers are its run's own
        summary = json.loads((out / "runs" / child.data.tags["method"] / "summary.json").read_text())
        assert child.data.metrics["summary.trainable_params"] == summary["trainable_params"]


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of a .wandb file: W&B's record log (7-byte header, then 32 KiB blocks of
    records, each a 7-byte header — CRC, length, type — and a piece of a protobuf Record)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    position, pieces, rows = 7, b"", []
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        if room < 7:  # the rest of a block too short for a header is padding
            position += room
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        pieces += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            if record.HasField("history"):
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                rows.append(row)
    return rows


def test_wandb_offline_run_directory_holds_the_same_series(stores):
    model_dir = tiny_bert_dir(stores)
    config = classification_config(stores / "cfg", model_dir, max_steps=3, report_to=["wandb"])
    summary = train_from_config(str(config))
    out = Path(summary["output_dir"])
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    logged = records(out)
    assert [(row["_step"], row["loss"]) for row in history if "loss" in row] == \
        [(r["step"], r["loss"]) for r in logged if "loss" in r]
    assert [(row["_step"], row["eval_accuracy"]) for row in history if "eval_accuracy" in row] == \
        [(r["step"], r["eval_accuracy"]) for r in logged if "eval_accuracy" in r]
    assert json.loads((out / "tracking.json").read_text())["wandb"]["run_id"] in run_file.name
    assert not (stores / "wandb").exists()


def test_unreachable_tracking_server_warns_and_training_goes_on(stores, monkeypatch, capsys):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    model_dir = tiny_bert_dir(stores)
    config = classification_config(stores / "cfg", model_dir, max_steps=2,
                                   report_to=["tensorboard", "mlflow"])
    summary = train_from_config(str(config))
    out = Path(summary["output_dir"])
    assert summary["steps"] == 2 and [r["step"] for r in records(out) if "loss" in r] == [1, 2]
    assert list((out / "tensorboard").iterdir())  # the other tracker kept going
    err = capsys.readouterr().err
    assert err.count("warning: mlflow stopped receiving this run") == 1


def test_missing_tracker_package_is_one_line_naming_the_extra(stores, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    model_dir = tiny_bert_dir(stores)
    config = classification_config(stores / "cfg", model_dir, max_steps=2)
    capsys.readouterr()
    assert main(["train", str(config), "train.report_to=[tensorboard, wandb]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'deltatune[wandb]'" in err and "train.report_to" in err
    assert not (stores / "cfg" / "runs").exists()  # nothing trained, nothing written


@pytest.mark.parametrize("value,expected", [("none", []), ("[]", []), ("mlflow", ["mlflow"]),
                                            ("[wandb, tensorboard]", ["wandb", "tensorboard"])])
def test_report_to_accepts_a_list_or_none(stores, value, expected):
    from deltatune.config.run import load_run_config

    config = classification_config(stores / "cfg", stores / "model")
    assert load_run_config(str(config), [f"train.report_to={value}"]).train.report_to == expected
    assert load_run_config(str(config)).train.report_to == ["tensorboard"]


def test_report_to_names_the_tracker_it_does_not_know(stores, capsys):
    config = classification_config(stores / "cfg", stores / "model")
    assert main(["train", str(config), "train.report_to=[mlfow]"]) == 2
    err = capsys.readouterr().err
    assert "train.report_to: 'mlfow' is not a tracker" in err and "did you mean 'mlflow'" in err


def test_tracker_failing_mid_run_warns_once_and_loses_nothing(stores, monkeypatch, capsys):
    from mlflow import MlflowClient

    real = MlflowClient.log_batch
    sent = []

    def log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        if metrics:  # the server goes down after the first step's numbers
            if sent:
                raise ConnectionError("tracking server went away")
            sent.append([m.step for m in metrics])
        return real(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    model_dir = tiny_bert_dir(stores)
    config = classification_config(stores / "cfg", model_dir, max_steps=4, save_every=2,
                                   report_to=["mlflow"])
    summary = train_from_config(str(config))
    out = Path(summary["output_dir"])
    assert summary["steps"] == 4 and [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3, 4]
    assert sent and sent[0][0] == 1
    err = capsys.readouterr().err
    assert err.count("warning: mlflow stopped receiving this run") == 1
    assert "tracking server went away" in err
