"""`deltatune ui` without a browser: what the runs folder reads as, the launch form's checks,
stopping a job, the API key, and the playground's numbers against the library's own."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

import deltatune as dt
from deltatune.serving.generate import generate_text
from deltatune.training.progress import RunLog
from deltatune.ui import runs as runs_index
from deltatune.ui.app import build_app
from deltatune.ui.launch import FormError, Jobs, config_from_form, write_config
from deltatune.ui.playground import BASE, Playground
from tiny_runs import one_thread  # noqa: F401  (the fixture)
from ui_site import (COMPARED, finish_comparison, make_site, start_comparison, train_chat_run,
                     train_compared_method)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    torch.set_num_threads(1)
    site = make_site(tmp_path_factory.mktemp("ui"))
    site["cmp"] = start_comparison(site)
    site["summaries"] = {"lora": train_compared_method(site, site["cmp"], "lora")}
    train_chat_run(site)
    return site


def form(site, **values) -> dict:
    base = {"kind": "train", "name": "run1", "model": str(site["bert"]), "task": "classification",
            "train": str(site["train"]), "eval": str(site["dev"]), "format": "classification",
            "method": "lora", "r": "4", "max_steps": "3", "batch_size": "8"}
    return {**base, **values}


def test_comparison_fills_in_as_methods_finish_then_reads_results(site):
    live = runs_index.comparison_detail(site["runs"], "cmp")
    assert live["state"] == "running" and live["progress"] == {"lora": "finished", "prompt": "waiting"}
    assert [r["method"] for r in live["rows"]] == ["lora"]
    assert live["rows"][0]["trainable_params"] == site["summaries"]["lora"]["trainable_params"]
    site["summaries"]["prompt"] = train_compared_method(site, site["cmp"], "prompt")
    rows = finish_comparison(site, site["cmp"], site["summaries"])
    done = runs_index.comparison_detail(site["runs"], "cmp")
    assert done["state"] == "finished" and [r["method"] for r in done["rows"]] == COMPARED
    assert done["rows"][1]["score"] == rows[1]["score"]
    assert "Best task score" in done["reading"] and "![" not in done["reading"]
    listing = runs_index.scan(site["runs"])
    assert [c["id"] for c in listing["comparisons"]] == ["cmp"]
    by_id = {r["id"]: r for r in listing["runs"]}
    assert by_id["cmp/runs/lora"]["comparison"] == "cmp" and by_id["chat"]["task"] == "causal-lm"
    summary = site["summaries"]["lora"]
    assert by_id["cmp/runs/lora"]["score"] == summary["final_eval"]["accuracy"]
    assert by_id["cmp/runs/lora"]["saved_mb"] == summary["saved_size_bytes"] / 2 ** 20


def test_a_partial_run_is_followed_line_by_line(site):
    partial = site["runs"] / ".live.partial"
    partial.mkdir()
    (partial / "config.yaml").write_text("model: m\ntask: classification\nmethod: {name: lora, r: 2}\n")
    log = RunLog(partial, total_steps=10)
    for step in (1, 2):
        log.log({"step": step, "loss": 1.0 / step})
    first = runs_index.run_detail(site["runs"], "live")
    assert first["state"] == "training" and [r["step"] for r in first["metrics"]] == [1, 2]
    with open(partial / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "lo')  # a line still being written is not read yet
    assert runs_index.run_detail(site["runs"], "live", since=first["next"])["metrics"] == []
    with open(partial / "metrics.jsonl", "a") as handle:
        handle.write('ss": 0.3}\n')
    later = runs_index.run_detail(site["runs"], "live", since=first["next"])
    assert [r["step"] for r in later["metrics"]] == [3] and later["next"] == 3
    log.close()
    row = next(r for r in runs_index.scan(site["runs"])["runs"] if r["id"] == "live")
    assert row["state"] == "training" and row["steps"] == 3 and row["method_label"] == "lora r=2"


def test_ids_outside_the_runs_folder_are_refused(site):
    with pytest.raises(dt.DeltatuneError, match="not inside the runs folder"):
        runs_index.run_detail(site["runs"], "../data")


@pytest.mark.parametrize("values, field", [
    ({"name": "bad name!"}, "name"), ({"name": "cmp"}, "name"), ({"model": "/nowhere/model"}, "model"),
    ({"train": "missing.jsonl"}, "train"), ({"r": "-1"}, "r"), ({"r": "four"}, "r"),
    ({"max_steps": "2.5"}, "max_steps"), ({"lr": "0"}, "lr"), ({"kind": "compare", "methods": []}, "methods"),
    ({"format": "alpaca"}, "format"), ({"label_names": "only-one"}, "label_names"), ({"target_modules": "query", "alpha": "-3"}, "alpha"),
])
def test_bad_form_input_names_its_field(site, values, field):
    jobs = Jobs(site["runs"])
    with pytest.raises(FormError) as caught:
        jobs.start(form(site, **values))
    assert field in caught.value.errors, caught.value.errors
    assert "Traceback" not in json.dumps(caught.value.errors)


def test_form_becomes_the_config_the_cli_would_read(site):
    kind, values = config_from_form(form(site, kind="compare", methods=["lora", "prompt", "full"],
                                         num_virtual_tokens="7", r="2", eval_every="2",
                                         label_names="neg, pos"), site["runs"])
    assert kind == "compare" and values["compare"]["methods"] == ["lora", "prompt", "full"]
    assert values["compare"]["per_method"] == {"lora": {"method": {"r": 2}},
                                               "prompt": {"method": {"num_virtual_tokens": 7}}}
    assert values["train"]["max_steps"] == 3 and values["train"]["save_every"] == 2
    assert values["data"]["label_names"] == ["neg", "pos"]
    assert values["output_dir"] == str(site["runs"] / "run1")


def test_lora_init_and_loraplus_reach_the_config(site):
    kind, values = config_from_form(form(site, init="pissa", loraplus_lr_ratio="16"), site["runs"])
    assert values["method"]["init"] == "pissa" and values["train"]["loraplus_lr_ratio"] == 16
    kind, values = config_from_form(form(site, kind="compare", methods=["lora", "prompt"], init="olora",
                                         loraplus_lr_ratio="8"), site["runs"])
    assert values["compare"]["per_method"]["lora"] == {"method": {"r": 4, "init": "olora"},
                                                      "train": {"loraplus_lr_ratio": 8}}
    assert "train" not in values["compare"]["per_method"].get("prompt", {})  # prompt would refuse it
    kind, values = config_from_form(form(site, init="default"), site["runs"])
    assert "init" not in values["method"]
    jobs = Jobs(site["runs"])
    with pytest.raises(FormError) as caught:  # validated as the CLI would: named field, one line
        jobs.start(form(site, method="prompt", loraplus_lr_ratio="16"))
    assert "applies to lora, dora only" in caught.value.errors["loraplus_lr_ratio"]


def test_stop_interrupts_a_training_job(site):
    jobs = Jobs(site["runs"])
    job = jobs.start(form(site, name="long", max_steps="100000", eval_every="50"))
    metrics = site["runs"] / ".long.partial" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.stat().st_size > 0):
        assert jobs.list()[0]["state"] == "running", jobs.list()[0]["log"]
        assert time.time() < deadline
        time.sleep(0.2)
    jobs.stop(job["id"])
    jobs.jobs[job["id"]].process.wait(timeout=30)
    assert jobs.list()[0]["state"] == "stopped"
    assert not (site["runs"] / "long").exists()  # never a half-written run


def test_api_key_guards_the_api_not_the_page(site):
    with TestClient(build_app(site["runs"], api_key="s3cret")) as client:
        assert client.get("/").status_code == 200 and "deltatune" in client.get("/").text
        assert client.get("/static/chart.js").status_code == 200
        assert client.get("/api/runs").status_code == 401
        assert client.get("/api/runs", headers={"Authorization": "Bearer nope"}).status_code == 401
        listing = client.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).json()
        assert {r["id"] for r in listing["runs"]} >= {"chat", "cmp/runs/lora"}
        answer = client.post("/api/launch", content=b"{", headers={"Authorization": "Bearer s3cret"})
        assert answer.status_code == 400 and answer.json() == {"error": "the request body is not valid JSON"}


@pytest.mark.parametrize("args, message", [
    (["--host", "0.0.0.0"], "needs --api-key"), (["--port", "70000"], "--port"),
])
def test_cli_refuses_unsafe_or_impossible_binding(tmp_path, args, message):
    result = subprocess.run([sys.executable, "-m", "deltatune.cli", "ui", "--runs", str(tmp_path), *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_playground_classifies_as_the_library_does(site):
    play = Playground(site["runs"])
    ids = ["cmp/runs/lora", "cmp/runs/prompt", BASE]
    results = play.classify(str(site["bert"]), ids, "the film was superb")
    assert [r["run"] for r in results] == ids
    for result, run_id in zip(results, ids):
        model, tokenizer = dt.load_model(str(site["bert"]), task="classification", num_labels=2)
        if run_id != BASE:
            dt.load_adapter(model, site["runs"] / run_id)
        with torch.no_grad():
            expected = torch.softmax(model.eval()(**tokenizer("the film was superb", return_tensors="pt")).logits[0], -1)
        assert list(result["probabilities"].values()) == pytest.approx(expected.tolist(), abs=1e-5)
        assert result["label"] == str(int(expected.argmax()))


def test_playground_chat_streams_the_library_answer(site):
    play = Playground(site["runs"])
    pieces = list(play.chat(str(site["llama"]), "chat", [{"role": "user", "content": "Repeat the word good."}],
                            max_tokens=12))
    model, tokenizer = dt.load_model(str(site["llama"]), task="causal-lm")
    dt.load_adapter(model, site["runs"] / "chat")
    expected = generate_text(model, tokenizer, "Repeat the word good.", max_new_tokens=12)
    assert "".join(pieces).strip() == expected and expected
    with pytest.raises(dt.DeltatuneError, match="type a message"):
        list(play.chat(str(site["llama"]), "chat", [{"role": "user", "content": " "}]))
    with pytest.raises(dt.DeltatuneError, match="not a finished causal-lm run"):
        list(play.chat(str(site["llama"]), "cmp/runs/lora", [{"role": "user", "content": "hi"}]))


def test_form_offers_the_weight_methods_options(site):
    """LoHa/LoKr take rank and alpha from the form, OFT/BOFT only target modules (their block
    sizes keep the method's defaults); each config passes the CLI's validation."""
    kind, _, values = write_config(form(site, name="weights", kind="compare",
                                        methods=["oft", "boft", "loha", "lokr"],
                                        r="4", alpha="8", target_modules="query, value"), site["runs"])
    targets = {"target_modules": ["query", "value"]}
    assert values["compare"]["per_method"] == {
        "oft": {"method": targets}, "boft": {"method": targets},
        "loha": {"method": {"r": 4, "alpha": 8.0, **targets}}, "lokr": {"method": {"r": 4, "alpha": 8.0, **targets}}}
