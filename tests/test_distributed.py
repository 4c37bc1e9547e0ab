"""The same `deltatune train` command under torchrun (2 CPU processes, gloo) trains the same
model as one process with the same global batch, and only rank 0 writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from deltatune.training.loop import train_from_config
from tiny_runs import one_thread  # noqa: F401
from tiny_runs import causal_config, tiny_llama_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_processes_match_one_process(tmp_path):
    # grad_accum 2 x batch 4 = 8 rows per step; under torchrun each rank sees 2 rows a micro-batch.
    config = causal_config(tmp_path / "cfg", tiny_llama_dir(tmp_path), rows=16, max_steps=4,
                           grad_accum=2, eval_every=2, save_every=2)
    one = train_from_config(str(config), [f"output_dir={tmp_path / 'one'}"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")])),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "deltatune.cli", "train", str(config), f"output_dir={tmp_path / 'two'}",
         "train.report_to=[tensorboard, mlflow]"],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["world_size"] == 2 and two["ranks_in_sync"] is True
    assert two["steps"] == one["steps"] == 4
    # Same data, same global batch, same loss normalisation: same weights up to float rounding.
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key
    assert any(a[k].abs().max() > 1e-3 for k in a if "lora_B" in k)  # training moved the weights
    assert abs(two["final_eval"]["loss"] - one["final_eval"]["loss"]) < 1e-4
    losses = lambda run: [r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert all(abs(x - y) < 1e-4 for x, y in zip(losses("one"), losses("two")))
    # Only rank 0 wrote: one event file, one set of checkpoints, no stray partial directory.
    assert len(list((tmp_path / "two" / "tensorboard").iterdir())) == 1
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    # ... and one MLflow run, rank 0's, with every step once
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.tags["world_size"] == "2"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3, 4]
