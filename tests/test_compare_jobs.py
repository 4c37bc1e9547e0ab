"""Reuse of finished comparison runs: data files compared by content, not modification time;
records that hold wherever the output directory is; key.json files of older versions."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from deltatune.compare import jobs
from deltatune.compare.jobs import Job, Progress, finished_state, fingerprint, local, portable, run_job


def _job(root: Path, out: Path) -> Job:
    data = root / "data"
    data.mkdir(exist_ok=True)
    for name in ("train.jsonl", "dev.jsonl"):
        if not (data / name).exists():
            (data / name).write_text("".join(json.dumps({"text": f"row {i}", "label": i % 2}) + "\n"
                                             for i in range(50)))
    values = {"model": "tiny", "data": {"train": str(data / "train.jsonl"), "eval": str(data / "dev.jsonl")},
              "train": {"lr": 1e-3, "seed": 0}, "method": {"name": "lora"},
              "output_dir": str(out / "runs" / "lora")}
    return Job("lora", values, 4, "lora seed 0")


def _finish(job: Job, out: Path) -> None:
    """run_job with a stand-in child that writes the run's summary: key.json as a real run leaves it."""
    def child(values: dict, job_dir: Path, on_start=None) -> dict:
        run_dir = Path(values["output_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        summary = {"output_dir": str(run_dir), "final_eval": {"accuracy": 0.5}, "metric": "accuracy"}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    run_job(job, out, child, Progress(1, 4, 1, "final"), "final")


def test_touching_or_recopying_the_data_keeps_the_run_and_one_changed_byte_makes_it_stale(tmp_path):
    out = tmp_path / "cmp"
    job = _job(tmp_path, out)
    _finish(job, out)
    assert finished_state(job, out) == ("reuse", "")
    train = Path(job.values["data"]["train"])
    os.utime(train, (1_000_000, 1_000_000))  # touched
    assert finished_state(job, out) == ("reuse", "")
    train.write_bytes(train.read_bytes())  # copied again, same bytes
    assert finished_state(job, out) == ("reuse", "")
    text = train.read_bytes()
    train.write_bytes(text[:10] + (b"X" if text[10:11] != b"X" else b"Y") + text[11:])  # same size
    state, why = finished_state(job, out)
    assert state == "stale" and why.startswith("train_file.fingerprint: 'sha256:")
    key = json.loads((out / "jobs" / "lora" / "key.json").read_text())
    assert "mtime" not in json.dumps(key)
    assert key["config"]["output_dir"] == "{output_dir}/runs/lora"  # relative to the output dir


def test_a_key_of_an_older_version_is_reused_only_while_the_files_modification_time_holds(tmp_path):
    out = tmp_path / "cmp"
    job = _job(tmp_path, out)
    _finish(job, out)
    old = {"config": job.values}  # as older versions wrote it: absolute paths, mtime stamps
    for name, field in (("train_file", "train"), ("eval_file", "eval")):
        path = Path(job.values["data"][field])
        old[name] = {"path": str(path), "bytes": path.stat().st_size, "mtime": path.stat().st_mtime}
    (out / "jobs" / "lora" / "key.json").write_text(json.dumps(old, indent=1))
    assert finished_state(job, out) == ("reuse", "")  # unchanged since: cannot have changed
    os.utime(job.values["data"]["eval"], (1_000_000, 1_000_000))
    state, why = finished_state(job, out)
    assert state == "stale" and "eval_file: recorded by an older deltatune by its modification time" in why
    # and an older key whose settings differ is stale for that difference
    old["eval_file"]["mtime"] = Path(job.values["data"]["eval"]).stat().st_mtime
    old["config"] = {**job.values, "train": {"lr": 5e-3, "seed": 0}}
    (out / "jobs" / "lora" / "key.json").write_text(json.dumps(old))
    state, why = finished_state(job, out)
    assert state == "stale" and why == "config.train.lr: 0.005 then, 0.001 now"


def test_a_big_file_is_fingerprinted_by_its_size_and_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "WHOLE_FILE_LIMIT", 1000)
    monkeypatch.setattr(jobs, "SAMPLE", 100)
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"a" * 5000)
    first = fingerprint(path)
    assert first.startswith("sha256-ends:")
    path.write_bytes(b"a" * 2500 + b"b" + b"a" * 2499)  # the middle, same size: not read
    assert fingerprint(path) == first
    path.write_bytes(b"a" * 4999 + b"b")  # the last bytes
    assert fingerprint(path) != first
    path.write_bytes(b"a" * 5001)  # the size
    assert fingerprint(path) != first
    small = tmp_path / "small.jsonl"
    small.write_bytes(b"a" * 999)
    assert fingerprint(small).startswith("sha256:")


def test_records_name_output_dir_paths_relative_to_it(tmp_path):
    here, there = tmp_path / "a" / "cmp", tmp_path / "b" / "cmp"
    record = {"output_dir": str(here / "runs" / "lora-s0"), "data": str(tmp_path / "data.jsonl"),
              "list": [str(here)], "other": str(here) + "-old/x", "n": 3}
    stored = portable(record, here)
    assert stored == {"output_dir": "{output_dir}/runs/lora-s0", "data": str(tmp_path / "data.jsonl"),
                      "list": ["{output_dir}"], "other": str(here) + "-old/x", "n": 3}
    assert local(stored, there)["output_dir"] == str((there / "runs" / "lora-s0").resolve())
    assert local(stored, here) == {**record, "output_dir": str((here / "runs" / "lora-s0").resolve()),
                                   "list": [str(here.resolve())]}


@pytest.mark.parametrize("missing", ["hf:glue/sst2", "/nonexistent/file.jsonl"])
def test_files_that_are_not_on_disk_have_no_stamp(missing):
    assert jobs._stamp(missing) is None


def test_an_older_key_with_a_relative_output_dir_is_reused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = (tmp_path / "cmp").resolve()
    job = _job(tmp_path, out)
    _finish(job, out)
    key_path = out / "jobs" / "lora" / "key.json"
    old = json.loads(key_path.read_text())
    old["config"]["output_dir"] = "cmp/runs/lora"  # the config's relative output_dir, as recorded then
    key_path.write_text(json.dumps(old))
    assert finished_state(job, out) == ("reuse", "")
