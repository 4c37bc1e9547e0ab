"""Continuous batching, adapters on demand, the API key, limits, metrics and graceful shutdown.

A tiny float64 Llama (batched and one-row runs agree to ~1e-12, so greedy tokens must match the
library's generate() exactly) with four LoRA adapters saved in one --adapter-dir.
"""
from __future__ import annotations

import copy
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from byte_tokenizer import tiny_chat_llama
from conftest import randomize_trainable

import deltatune as dt
from deltatune.serving.adapter_pool import AdapterPool
from deltatune.serving.app import build_app
from deltatune.serving.engine import ContinuousEngine, Job
from deltatune.serving.limits import Limits
from deltatune.serving.server import ServerThread

NAMES = ["a", "b", "c", "d"]
PROMPTS = ["Hello there", "The capital of France is", "1, 2, 3,", "Once upon a time, far away"]
KEY = "sk-test-123"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("continuous")
    base, tokenizer = tiny_chat_llama()
    base = base.double()
    for seed, name in enumerate(NAMES):
        targets = [["q_proj", "v_proj"], ["v_proj", "down_proj"], ["k_proj", "o_proj"], ["up_proj"]][seed]
        model = dt.apply(copy.deepcopy(base), dt.LoraConfig(r=4, target_modules=targets))
        randomize_trainable(model, seed=20 + seed, std=0.3)
        dt.save_adapter(model, tmp / "adapters" / name)
    return {"base": base, "tokenizer": tokenizer, "dir": tmp / "adapters", "cache": {}}


def library_ids(setup, adapter: str | None, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy ids from the library alone: a fresh base + load_adapter + generate() on one row."""
    key = (adapter, tuple(prompt_ids), max_tokens)
    if key not in setup["cache"]:
        model = copy.deepcopy(setup["base"])
        if adapter is not None:
            dt.load_adapter(model, setup["dir"] / adapter, name=adapter)
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=0, eos_token_id=2)
        ids = out[0, len(prompt_ids):].tolist()
        setup["cache"][key] = ids[: ids.index(2)] if 2 in ids else ids
    return setup["cache"][key]


def test_rows_join_mid_generation_and_adapters_come_and_go(setup):
    """Greedy ids equal generate()'s for every request while rows join a running batch and
    adapters are loaded and evicted (--max-adapters 2, four adapters asked for)."""
    model, tokenizer = copy.deepcopy(setup["base"]), setup["tokenizer"]
    pool = AdapterPool(model, "tiny", adapter_dir=setup["dir"], max_adapters=2)
    engine = ContinuousEngine(model, tokenizer, pool, max_batch=6)
    engine.start()
    try:
        def job(adapter, prompt, max_tokens):
            return engine.submit(Job(prompt_ids=tokenizer(prompt).input_ids, adapter=adapter,
                                     max_tokens=max_tokens, ignore_eos=False))
        first = [job("a", PROMPTS[0], 20), job("b", PROMPTS[1], 14), job(None, PROMPTS[2], 16)]
        while len(first[0].token_ids) < 3:  # the batch is running...
            time.sleep(0.001)
        later = [job("c", PROMPTS[3], 8), job("a", PROMPTS[1], 6), job("d", PROMPTS[0], 9),
                 job(None, PROMPTS[3], 4), job("b", PROMPTS[2], 10), job("c", PROMPTS[0], 5)]
        jobs = first + later
        for j in jobs:
            j.result(timeout=120)
    finally:
        engine.stop()
    for j in jobs:
        assert j.finish_reason in ("length", "stop") and j.error is None
        assert j.token_ids == library_ids(setup, j.adapter, j.prompt_ids, j.max_tokens), j.adapter
        assert j.text == tokenizer.decode(j.token_ids, skip_special_tokens=True)
    assert engine.joins_while_running > 0 and engine.mixed_steps > 0
    assert pool.metrics.adapter_loads.get() >= 4 and pool.metrics.adapter_evictions.get() >= 2
    assert len(pool.resident) <= 2 and not any(pool.in_use.values())


def test_admission_prefers_resident_adapters_then_demand_but_never_starves(setup):
    """One slot, "a" resident: waiting jobs of "a" join before older ones of other adapters, then
    the adapter with most waiting jobs takes the slot; a job waiting past STARVING_S goes first."""
    from deltatune.serving import engine as engine_module

    model, tokenizer = copy.deepcopy(setup["base"]), setup["tokenizer"]
    pool = AdapterPool(model, "tiny", adapter_dir=setup["dir"], max_adapters=1)
    engine = ContinuousEngine(model, tokenizer, pool, max_batch=8)  # not started: _admit by hand
    ids = tokenizer("hi").input_ids

    def admit(adapters, ages=None):
        now = time.monotonic()
        engine.waiting = [Job(prompt_ids=ids, adapter=a, max_tokens=2, submitted=now - (ages or {}).get(i, 0))
                          for i, a in enumerate(adapters)]
        rows = engine._admit()
        for row in rows:
            pool.release(row.job.adapter)
        return [row.job.adapter for row in rows]

    pool.preload("a")
    assert admit(["b", "a", "c", "c", None, "a"]) == ["a", None, "a"]  # resident first, in order
    assert admit(["b", "c", "c"]) == ["c", "c"]  # "a" (idle) leaves for "c": 2 waiting beat older "b"
    assert admit(["c", "b", "c"], ages={1: engine_module.STARVING_S + 1}) == ["b"]  # "b" starved


def test_sampling_stop_n_and_logprobs(setup):
    model, tokenizer = copy.deepcopy(setup["base"]), setup["tokenizer"]
    app = build_app(model, tokenizer, base_name="tiny", adapter_dir=setup["dir"])
    from fastapi.testclient import TestClient

    body = {"model": "b", "prompt": PROMPTS[3], "max_tokens": 8}
    with TestClient(app) as client:
        sampled = [client.post("/v1/completions", json={**body, "temperature": 1.0, "seed": 5, "n": 2}).json()
                   for _ in range(2)]
        greedy = client.post("/v1/completions", json={**body, "temperature": 0, "logprobs": 2}).json()
        text = greedy["choices"][0]["text"]
        stop = text[4:6]
        stopped = client.post("/v1/completions", json={**body, "temperature": 0, "stop": [stop]}).json()
    assert [c["text"] for c in sampled[0]["choices"]] == [c["text"] for c in sampled[1]["choices"]]
    assert sampled[0]["choices"][0]["text"] != sampled[0]["choices"][1]["text"]  # seed + choice
    assert sampled[0]["usage"]["completion_tokens"] == 16
    text = greedy["choices"][0]["text"]
    expected = library_ids(setup, "b", tokenizer(PROMPTS[3]).input_ids, 8)
    assert text == tokenizer.decode(expected, skip_special_tokens=True)
    lp = greedy["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(expected) == len(lp["top_logprobs"])
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 2 and chosen == pytest.approx(max(top.values())) and chosen <= 0
    assert len(stop) == 2 and stopped["choices"][0]["text"] == text[: text.find(stop)] and stopped["choices"][0]["finish_reason"] == "stop"


@pytest.fixture(scope="module")
def server(setup):
    model = copy.deepcopy(setup["base"])
    limits = Limits(max_queue=1, max_tokens=300, max_prompt_tokens=100, max_body_bytes=4000)
    app = build_app(model, setup["tokenizer"], base_name="tiny", adapter_dir=setup["dir"], max_adapters=2,
                    max_batch=1, api_key=KEY, limits=limits)
    thread = ServerThread(app)
    yield {"url": thread.url, "engine": app.state.engine, "thread": thread}
    thread.stop()


def post(server, path, body, key=KEY, **kwargs):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server["url"] + path, json=body, headers=headers, timeout=60, **kwargs)


def test_api_key(server):
    body = {"model": "a", "prompt": "hi", "max_tokens": 2}
    assert post(server, "/v1/completions", body, key=None).status_code == 401
    wrong = post(server, "/v1/completions", body, key="sk-wrong")
    assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
    assert httpx.get(server["url"] + "/v1/models", timeout=60).status_code == 401
    assert httpx.get(server["url"] + "/metrics", timeout=60).status_code == 401
    assert httpx.get(server["url"] + "/health", timeout=60).json() == {"status": "ok"}
    assert post(server, "/v1/completions", body).status_code == 200


@pytest.mark.parametrize("body, status, words", [
    ({"model": "a", "prompt": "hi", "max_tokens": 301}, 400, "the limit is 300 (max_tokens_limit)"),
    ({"model": "a", "prompt": "hi", "max_tokens": 100, "n": 4}, 400, "max_tokens x n is 400"),
    ({"model": "a", "prompt": "x" * 101, "max_tokens": 1}, 400, "the limit is 100 (max_prompt_tokens)"),
    ({"model": "a", "prompt": "x" * 5000}, 413, "larger than the limit of 4000 bytes"),
    ({"model": "a", "prompt": "hi", "logprobs": 9}, 400, "'logprobs' must be at most 5"),
])
def test_limits(server, body, status, words):
    response = post(server, "/v1/completions", body)
    assert response.status_code == status and words in response.json()["error"]["message"]


def test_full_queue_gets_429_with_retry_after(server):
    engine = server["engine"]
    long = {"model": "tiny", "prompt": "hi", "max_tokens": 250, "ignore_eos": True, "temperature": 0}
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, server, "/v1/completions", long)
        while engine.running_rows < 1:
            time.sleep(0.001)
        queued = pool.submit(post, server, "/v1/completions", long)  # max_batch 1: it waits
        while engine.queue_depth() < 1:
            time.sleep(0.001)
        refused = post(server, "/v1/completions", long)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert "busy" in refused.json()["error"]["message"]
        assert running.result().status_code == queued.result().status_code == 200
    assert queued.result().json()["usage"]["completion_tokens"] == 250


def test_load_and_unload_adapter_endpoints(server, setup):
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": str(setup["dir"] / "b")}).text \
        == "Success: LoRA adapter 'extra' added successfully."
    ids = [m["id"] for m in httpx.get(server["url"] + "/v1/models", headers={"authorization": f"Bearer {KEY}"},
                                      timeout=60).json()["data"]]
    assert ids == ["tiny", "extra", "a", "b", "c", "d"]
    tokenizer = setup["tokenizer"]
    reply = post(server, "/v1/completions", {"model": "extra", "prompt": PROMPTS[0], "max_tokens": 6,
                                             "temperature": 0}).json()
    expected = library_ids(setup, "b", tokenizer(PROMPTS[0]).input_ids, 6)
    assert reply["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    again = post(server, "/v1/load_lora_adapter", {"lora_name": "extra", "lora_path": str(setup["dir"] / "b")})
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
    bad = post(server, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(setup["dir"])})
    assert bad.status_code == 400 and "not an adapter directory" in bad.json()["error"]["message"]
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "extra"}).status_code == 200
    gone = post(server, "/v1/completions", {"model": "extra", "prompt": "x", "max_tokens": 2})
    assert gone.status_code == 404
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "extra"}).status_code == 404


def test_metrics_parse(server):
    from prometheus_client.parser import text_string_to_metric_families

    post(server, "/v1/completions", {"model": "c", "prompt": "hi", "max_tokens": 3, "ignore_eos": True})
    assert httpx.get(server["url"] + "/metrics", timeout=60).status_code == 401  # counted too
    text = httpx.get(server["url"] + "/metrics", headers={"authorization": f"Bearer {KEY}"}, timeout=60).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("deltatune_requests_total", (("adapter", "c"), ("finish_reason", "length")))] >= 1
    assert samples[("deltatune_generation_tokens_total", (("adapter", "c"),))] >= 3
    assert samples[("deltatune_rejected_requests_total", (("status", "401"),))] >= 1
    assert families["deltatune_time_to_first_token_seconds"].type == "histogram"
    count = samples[("deltatune_request_latency_seconds_count", ())]
    assert count == samples[("deltatune_request_latency_seconds_bucket", (("le", "+Inf"),))] >= 1
    for name in ("deltatune_queue_depth", "deltatune_running_batch_size", "deltatune_adapters_resident",
                 "deltatune_adapter_loads_total", "deltatune_adapter_evictions_total"):
        assert name in families or name.removesuffix("_total") in families
    assert samples[("deltatune_prefill_forwards_total", ())] >= 1
    assert samples[("deltatune_engine_seconds_total", (("phase", "prefill"),))] > 0
    assert samples[("deltatune_engine_seconds_total", (("phase", "decode"),))] > 0


def test_timeout_gives_504(setup):
    from fastapi.testclient import TestClient

    app = build_app(copy.deepcopy(setup["base"]), setup["tokenizer"], base_name="tiny",
                    limits=Limits(request_timeout=0.05))
    with TestClient(app) as client:
        reply = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 500,
                                                     "ignore_eos": True})
    assert reply.status_code == 504 and "timed out after 0.05 s" in reply.json()["error"]["message"]


def test_graceful_shutdown_finishes_in_flight_requests(setup):
    """What SIGTERM does (uvicorn's should_exit): every request already in flight, streaming or
    not, still gets its whole answer; then the server is gone."""
    app = build_app(copy.deepcopy(setup["base"]), setup["tokenizer"], base_name="tiny",
                    adapter_dir=setup["dir"], max_batch=4)
    server = ServerThread(app)
    engine = app.state.engine

    def one(i):
        body = {"model": NAMES[i % 4], "prompt": PROMPTS[i % 4], "max_tokens": 60, "ignore_eos": True,
                "temperature": 0, "stream": i % 2 == 0}
        response = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
        return response.status_code, response.text

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one, i) for i in range(6)]
        while engine.running_rows + engine.queue_depth() < 6:  # all six in flight, none done
            assert not any(f.done() for f in futures)
            time.sleep(0.001)
        server.terminate()
        results = [f.result() for f in futures]
    server.thread.join(60)
    assert not server.thread.is_alive() and engine.thread is None
    for i, (status, body) in enumerate(results):
        assert status == 200
        if i % 2 == 0:
            assert body.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in body
        else:
            assert json.loads(body)["usage"]["completion_tokens"] == 60
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=5)


def test_sigterm_drains_the_cli_server(setup, tmp_path):
    """The real thing: `deltatune serve` in its own process gets SIGTERM while requests run;
    each still gets its whole answer and the process exits 0. (In bf16: --dtype reaches the
    model, and fp32 adapters serve on a bf16 base.)"""
    import os
    import signal
    import socket
    import subprocess
    import sys

    model_dir = tmp_path / "tiny"
    copy.deepcopy(setup["base"]).float().save_pretrained(model_dir)
    setup["tokenizer"].save_pretrained(model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DELTATUNE_API_KEY": KEY}
    server = subprocess.Popen([sys.executable, "-m", "deltatune.cli", "serve", "--model", str(model_dir),
                               "--port", str(port), "--adapter-dir", str(setup["dir"]), "--max-batch", "2",
                               "--dtype", "bf16"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
            time.sleep(0.2)
        headers = {"authorization": f"Bearer {KEY}"}

        def one(i):
            body = {"model": NAMES[i], "prompt": PROMPTS[i], "max_tokens": 400, "ignore_eos": True}
            return httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=120)

        def running_rows() -> float:
            text = httpx.get(url + "/metrics", headers=headers, timeout=5).text
            return sum(float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith("deltatune_running_batch_size"))

        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(one, i) for i in range(3)]
            # SIGTERM once rows are decoding (two running with --max-batch 2, one waiting), not
            # after a fixed sleep: a fast machine could finish everything before it
            deadline = time.monotonic() + 60
            while running_rows() < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not all(f.done() for f in futures)
            server.send_signal(signal.SIGTERM)
            replies = [f.result() for f in futures]
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
    assert [r.status_code for r in replies] == [200, 200, 200]
    assert [r.json()["usage"]["completion_tokens"] for r in replies] == [400, 400, 400]
    log = server.stdout.read()
    assert "every request in flight was answered" in log and "(continuous batching, bf16" in log
