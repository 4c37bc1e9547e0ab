"""A comparison in the trackers: one MLflow parent run with a child run per training run (every
search candidate and every final run: method, seed, data size), and one W&B group.

    with comparison_tracking(config, out_dir) as parent:   # children started inside see the parent
        rows = run_comparison(...)
        parent.finish(rows)

The parent's params are the comparison's config (its `compare:` settings included); its metrics
are results.json's numbers, one `METHOD/COLUMN` metric per cell (so MLflow's compare view shows
report.md's table); report.md, results.json/.csv and the plots are its artifacts. The children
are the `deltatune train` processes, told the parent through the environment: MLflow's tracking
URI (so they share its store), PARENT_RUN_ENV, and WANDB_RUN_GROUP. The parent's id is kept in
OUT/tracking.json, so running the comparison again continues the same parent run.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from deltatune.tracking import check_installed
from deltatune.tracking.base import flatten, metric_key, numbers, read_ids, write_ids

OUTPUTS = ("report.md", "results.json", "results.csv", "tradeoffs.png", "curves.png", "curves.json",
           "config.yaml")


class ComparisonTracking:
    def __init__(self, config: Any, out_dir: Path, study: str = "") -> None:
        self.config, self.out_dir = config, Path(out_dir)
        self.study = study  # the search's Optuna storage URL, named on the parent run
        self.names = [n for n in config.train.report_to if n in ("mlflow", "wandb")]
        self.mlflow: Any = None
        self.run_id = ""
        self.wandb: Any = None

    def _warn(self, name: str, what: str, exc: Exception) -> None:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        print(f"warning: {name}: the comparison's run was not {what} ({reason}); the comparison goes on",
              file=sys.stderr, flush=True)
        if name == "mlflow":
            self.mlflow = None
        else:
            self.wandb = None

    def start(self) -> dict[str, str]:
        """Open the parent run(s); returns the environment the children need."""
        env: dict[str, str] = {}
        if "mlflow" in self.names:
            try:
                env.update(self._start_mlflow())
            except Exception as exc:  # noqa: BLE001 - the tracker must not stop the comparison
                self._warn("mlflow", "started", exc)
        if "wandb" in self.names:
            env["WANDB_RUN_GROUP"] = os.environ.get("WANDB_RUN_GROUP") or self.out_dir.name
            try:
                self._start_wandb(env["WANDB_RUN_GROUP"])
            except Exception as exc:  # noqa: BLE001
                self._warn("wandb", "started", exc)
        return env

    def _start_mlflow(self) -> dict[str, str]:
        from deltatune.tracking.mlflow_run import (PARENT_RUN_ENV, client_for, experiment_id,
                                                   log_params, tracking_uri)

        uri = tracking_uri(self.out_dir)
        client = client_for(uri)
        known = read_ids(self.out_dir).get("mlflow") or {}
        if known.get("tracking_uri") == uri:
            self.run_id = known["run_id"]
            client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = experiment_id(client, uri)
            methods = ", ".join(self.config.compare.get("methods") or [])
            run = client.create_run(experiment, run_name=self.out_dir.name, tags={
                "kind": "comparison", "methods": methods, "base_model": str(self.config.model),
                "task": self.config.task, "output_dir": str(self.out_dir),
                **({"optuna_storage": self.study} if self.study else {})})
            self.run_id = run.info.run_id
            write_ids(self.out_dir, "mlflow", {"run_id": self.run_id, "experiment_id": experiment,
                                               "tracking_uri": uri})
            log_params(client, self.run_id, flatten(self.config.to_dict()))
        self.mlflow = client
        return {"MLFLOW_TRACKING_URI": uri, PARENT_RUN_ENV: self.run_id}

    def _start_wandb(self, group: str) -> None:
        from deltatune.tracking.wandb_run import init

        known = read_ids(self.out_dir).get("wandb") or {}
        self.wandb = init(self.out_dir, self.out_dir.name, known.get("run_id"), "comparison",
                          flatten(self.config.to_dict()), ["comparison"], group=group)
        write_ids(self.out_dir, "wandb", {"run_id": self.wandb.id, "project": self.wandb.project,
                                          "group": group})

    def finish(self, rows: list[dict] | None) -> None:
        """results.json's numbers as the parent's metrics, the outputs as its artifacts."""
        values = {metric_key(f"{row['method']}/{key}"): value
                  for row in rows or [] for key, value in numbers(row).items()}
        outputs = [self.out_dir / name for name in OUTPUTS if (self.out_dir / name).is_file()]
        if self.mlflow is not None:
            try:
                from deltatune.tracking.mlflow_run import log_numbers

                if rows is None:
                    self.mlflow.set_terminated(self.run_id, status="FAILED")
                else:
                    log_numbers(self.mlflow, self.run_id, values, 0)
                    for path in outputs:
                        self.mlflow.log_artifact(self.run_id, str(path))
                    self.mlflow.set_terminated(self.run_id, status="FINISHED")
            except Exception as exc:  # noqa: BLE001
                self._warn("mlflow", "finished", exc)
        if self.wandb is not None:
            try:
                import wandb

                if rows is not None:
                    self.wandb.summary.update(values)
                    report = wandb.Artifact(f"{self.wandb.id}-report", type="comparison")
                    for path in outputs:
                        report.add_file(str(path))
                    self.wandb.log_artifact(report)
                self.wandb.finish(exit_code=0 if rows is not None else 1)
            except Exception as exc:  # noqa: BLE001
                self._warn("wandb", "finished", exc)


@contextlib.contextmanager
def comparison_tracking(config: Any, out_dir: Path, study: str = "") -> Iterator[ComparisonTracking]:
    """The parent run(s) of a comparison; while inside, the children's environment is set (and
    restored afterwards). Leaving by an exception marks the parent failed."""
    check_installed(config.train.report_to)
    tracking = ComparisonTracking(config, out_dir, study)
    env = tracking.start()
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    finished = False
    try:
        yield tracking
        finished = True
    finally:
        if not finished:
            tracking.finish(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
