"""MLflow: one MLflow run per training run, through `mlflow.MlflowClient`.

Where: MLFLOW_TRACKING_URI when set (any tracking server or store); else a SQLite database in
the runs folder, `sqlite:///RUNS/mlflow.db` (RUNS: the folder holding output_dir), with the
artifacts beside it in RUNS/mlartifacts/ — a real database, nothing to start; `mlflow ui
--backend-store-uri sqlite:///RUNS/mlflow.db` shows it. The experiment is MLFLOW_EXPERIMENT_NAME,
else "deltatune".

What: the flattened config as params; every metrics.jsonl record as metrics at its step (loss,
lr, grad_norm, tokens_per_s, peak_memory_mb, eval_*); summary.json's numbers as `summary.*`
metrics; the final delta as the `adapter/` artifact and config.yaml, summary.json and
metrics.jsonl at the artifact root; tags for method, base model, quantization and world size.

Resume: the run id is kept in RUN_DIR/tracking.json, and `--resume` reopens that run. Steps
the interrupted process had already sent (it trained past its last checkpoint) are not sent
again, so each metric has one point per step. Under `deltatune compare` the run is a child of
the comparison's parent run (PARENT_RUN_ENV, set by tracking/comparison.py).
"""
from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

from deltatune.tracking.base import (RECORD_FILES, Tracker, flatten, metric_key, numbers, read_ids,
                                     write_ids)

DATABASE = "mlflow.db"
ARTIFACTS = "mlartifacts"
DEFAULT_EXPERIMENT = "deltatune"
PARENT_RUN_ENV = "DELTATUNE_MLFLOW_PARENT_RUN"   # a comparison's parent run id, for its children
MAX_PARAMS_PER_CALL = 100                        # MLflow's log_batch limits
MAX_METRICS_PER_CALL = 1000
SEND_EVERY_S = 1.0                               # at most one request a second from a run
_FLUSH = object()                                # in the send queue: send what is queued now
UI_ADDRESS = "http://127.0.0.1:5000"             # where `mlflow ui` serves by default


def tracking_uri(output_dir: Path) -> str:
    """MLFLOW_TRACKING_URI, else the SQLite database in the folder that holds `output_dir`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(output_dir).resolve().parent / DATABASE}"


def _artifact_location(uri: str) -> str | None:
    """Artifacts beside a SQLite database (MLflow would put them under the current directory);
    a server or file store decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / ARTIFACTS).resolve().as_uri()
    return None


def experiment_id(client: Any, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(uri))
    except MlflowException:  # another process created it meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def client_for(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def run_link(ids: dict[str, Any]) -> str:
    """The run's page in the MLflow UI: the server itself, or `mlflow ui`'s default address."""
    uri = ids.get("tracking_uri", "")
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_ADDRESS
    return f"{base}/#/experiments/{ids['experiment_id']}/runs/{ids['run_id']}"


def log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(key, str(value)) for key, value in params.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_CALL):
        client.log_batch(run_id, params=items[start:start + MAX_PARAMS_PER_CALL])


def as_metrics(values: dict[str, float], step: int) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(metric_key(k), v, now, step) for k, v in values.items()]


def log_numbers(client: Any, run_id: str, values: dict[str, float], step: int) -> None:
    metrics = as_metrics(values, step)
    for start in range(0, len(metrics), MAX_METRICS_PER_CALL):
        client.log_batch(run_id, metrics=metrics[start:start + MAX_METRICS_PER_CALL])


class Sender:
    """Sends metric batches from a background thread, in order, at most one request per
    SEND_EVERY_S (whatever queued up meanwhile goes in one request): a write to the SQLite store
    costs ~5 ms of CPU, which at every step of a small model would take a few percent of it. A
    failure is kept and raised by the next `put`, `flush` or `close`, in the training thread."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.queue: queue.Queue = queue.Queue()
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._send, name="deltatune-mlflow", daemon=True)
        self.thread.start()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, metrics: list) -> None:
        self._raise()
        self.queue.put(metrics)

    def flush(self) -> None:
        self.queue.put(_FLUSH)  # ends the current wait at once
        self.queue.join()
        self._raise()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _collect(self, last_sent: float) -> list:
        items = [self.queue.get()]
        deadline = last_sent + SEND_EVERY_S
        while not any(item is _FLUSH or item is None for item in items):
            wait = deadline - time.monotonic()
            try:
                items.append(self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _send(self) -> None:
        last_sent = 0.0
        while True:
            items = self._collect(last_sent)
            metrics = [m for item in items if isinstance(item, list) for m in item]
            try:
                for start in range(0, len(metrics) if self.error is None else 0, MAX_METRICS_PER_CALL):
                    self.client.log_batch(self.run_id, metrics=metrics[start:start + MAX_METRICS_PER_CALL])
            except Exception as exc:  # noqa: BLE001 - raised in the training thread by the next call
                self.error = exc
            finally:
                last_sent = time.monotonic()
                for _ in items:
                    self.queue.task_done()
            if any(item is None for item in items):
                return


def _tags(config: dict) -> dict[str, str]:
    method = config.get("method") or {}
    quantize = config.get("quantize")
    tags = {"method": str(method.get("name", "")), "base_model": str(config.get("model", "")),
            "quantization": str(quantize.get("type", quantize) if isinstance(quantize, dict) else quantize),
            "world_size": os.environ.get("WORLD_SIZE", "1"), "task": str(config.get("task", "")),
            "seed": str((config.get("train") or {}).get("seed", "")),
            "train_rows": str((config.get("data") or {}).get("max_train_rows") or "all"),
            "output_dir": str(config.get("output_dir", ""))}
    return tags


class MlflowRun(Tracker):
    name = "mlflow"

    def __init__(self) -> None:
        self.client = None
        self.run_id = ""
        self.highest: dict[str, int] | None = None  # resumed: key -> last step already sent
        self.sender: Sender | None = None

    def start(self, run_dir: Path, config: dict, resume: bool) -> None:
        uri = tracking_uri(Path(config["output_dir"]))
        self.client = client = client_for(uri)
        known = read_ids(run_dir).get(self.name) if resume else None
        if known and known.get("tracking_uri") == uri:
            self.run_id, self.highest = known["run_id"], {}
            client.update_run(self.run_id, status="RUNNING")
            self.sender = Sender(client, self.run_id)
            return
        parent = os.environ.get(PARENT_RUN_ENV)
        tags = _tags(config)
        if parent:
            tags["mlflow.parentRunId"] = parent
            tags["comparison_job"] = Path(config["output_dir"]).name
            experiment = client.get_run(parent).info.experiment_id
        else:
            experiment = experiment_id(client, uri)
        run = client.create_run(experiment, run_name=Path(config["output_dir"]).name, tags=tags)
        self.run_id = run.info.run_id
        write_ids(run_dir, self.name, {"run_id": self.run_id, "experiment_id": experiment,
                                       "tracking_uri": uri})
        log_params(client, self.run_id, flatten(config))
        self.sender = Sender(client, self.run_id)

    def _already_sent(self, key: str, step: int) -> bool:
        if self.highest is None:
            return False
        if key not in self.highest:
            history = self.client.get_metric_history(self.run_id, metric_key(key))
            self.highest[key] = max((m.step for m in history), default=-1)
        return step <= self.highest[key]

    def log_metrics(self, record: dict[str, Any], step: int) -> None:
        values = {k: v for k, v in numbers(record).items() if not self._already_sent(k, step)}
        if values:
            self.sender.put(as_metrics(values, step))

    def flush(self) -> None:
        self.sender.flush()

    def finish(self, summary: dict[str, Any] | None, run_dir: Path | None, failed: bool) -> None:
        if self.client is None:
            return
        sender, self.sender = self.sender, None
        if sender is not None:
            sender.close()
        if failed:
            self.client.set_terminated(self.run_id, status="FAILED")
            return
        log_numbers(self.client, self.run_id,
                    {f"summary.{k}": v for k, v in numbers(flatten(summary or {})).items()}, 0)
        for path in sorted(Path(run_dir).iterdir()):
            if path.is_file() and not path.name.startswith("."):
                self.client.log_artifact(self.run_id, str(path),
                                         None if path.name in RECORD_FILES else "adapter")
        self.client.set_terminated(self.run_id, status="FINISHED")
