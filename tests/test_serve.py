"""`deltatune serve`: a real uvicorn server on 127.0.0.1, driven by the official openai client."""
from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from byte_tokenizer import tiny_chat_llama
from conftest import randomize_trainable

import deltatune as dt
from deltatune.serving.app import build_app
from deltatune.serving.server import ServerThread, parse_adapter_specs

PROMPTS = ["Hello there", "The capital of France is", "1, 2, 3,", "Once upon"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two LoRA adapters (a, b) and a bottleneck adapter (c) served on a tiny float64 Llama
    (float64: batched and one-row runs agree to ~1e-12, so greedy texts must match exactly)."""
    tmp = tmp_path_factory.mktemp("serve")
    base, tokenizer = tiny_chat_llama()
    base = base.double()
    dirs = {}
    configs = {"a": dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
               "b": dt.LoraConfig(r=2, target_modules=["v_proj", "down_proj"]),
               "c": dt.AdapterConfig(bottleneck_size=8)}
    for seed, (name, config) in enumerate(configs.items()):
        model = dt.apply(copy.deepcopy(base), config)
        randomize_trainable(model, seed=10 + seed, std=0.3)
        dirs[name] = dt.save_adapter(model, tmp / name)
    served_model = copy.deepcopy(base)
    app = build_app(served_model, tokenizer, dirs, base_name="tiny", max_batch=8, batch_wait_ms=300)
    server = ServerThread(app)  # 127.0.0.1, a free port
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield {"url": server.url, "client": client, "engine": app.state.engine, "dirs": dirs,
           "base": base, "tokenizer": tokenizer}
    server.stop()


def library_text(served, adapter: str | None, prompt_ids: list[int], max_tokens: int = MAX_TOKENS) -> str:
    """Greedy text from the library alone: a fresh base + load_adapter + generate() on one row."""
    model = copy.deepcopy(served["base"])
    if adapter is not None:
        dt.load_adapter(model, served["dirs"][adapter], name=adapter)
    tokenizer = served["tokenizer"]
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


def complete(served, model: str, prompt: str, **kwargs):
    return served["client"].completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                               temperature=0, **kwargs)


def test_models_lists_base_and_adapters(served):
    ids = [m.id for m in served["client"].models.list().data]
    assert ids == ["tiny", "a", "b", "c"]


def test_concurrent_requests_for_two_adapters_match_library_generate(served):
    engine = served["engine"]
    mixed_before = engine.mixed_steps
    requests = [(name, prompt) for prompt in PROMPTS for name in ("a", "b")] + [("tiny", PROMPTS[0])]
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda r: complete(served, *r), requests))
    tokenizer = served["tokenizer"]
    texts = {}
    for (name, prompt), result in zip(requests, results):
        adapter = None if name == "tiny" else name
        expected = library_text(served, adapter, tokenizer(prompt).input_ids)
        assert result.choices[0].text == expected, (name, prompt)
        assert result.model == name and result.usage.prompt_tokens == len(tokenizer(prompt).input_ids)
        texts[name, prompt] = expected
    assert texts["a", PROMPTS[0]] != texts["b", PROMPTS[0]] != texts["tiny", PROMPTS[0]]
    # they really were batched together, across adapters
    assert engine.mixed_steps > mixed_before


def test_non_lora_adapter_is_served_in_its_own_batch(served):
    tokenizer = served["tokenizer"]
    requests = [("c", PROMPTS[1]), ("a", PROMPTS[1]), ("c", PROMPTS[2])]
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda r: complete(served, *r), requests))
    for (name, prompt), result in zip(requests, results):
        assert result.choices[0].text == library_text(served, name, tokenizer(prompt).input_ids)


def test_chat_completion_uses_the_chat_template(served):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    result = served["client"].chat.completions.create(model="b", messages=messages,
                                                      max_tokens=MAX_TOKENS, temperature=0)
    tokenizer = served["tokenizer"]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    expected = library_text(served, "b", tokenizer(text, add_special_tokens=False).input_ids)
    assert result.choices[0].message.content == expected
    assert result.choices[0].message.role == "assistant"


def test_streaming_gives_the_same_text(served):
    whole = complete(served, "a", PROMPTS[2]).choices[0].text
    stream = complete(served, "a", PROMPTS[2], stream=True)
    chunks = list(stream)
    assert len(chunks) > 2 and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].text for c in chunks) == whole
    chat = served["client"].chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5, temperature=0,
        stream=True)
    parts = list(chat)
    assert parts[0].choices[0].delta.role == "assistant"
    streamed = "".join(p.choices[0].delta.content or "" for p in parts)
    plain = served["client"].chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5, temperature=0)
    assert streamed == plain.choices[0].message.content


def test_max_tokens_and_stop(served):
    full = complete(served, "b", PROMPTS[3])
    assert full.usage.completion_tokens <= MAX_TOKENS
    short = served["client"].completions.create(model="b", prompt=PROMPTS[3], max_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert full.choices[0].text.startswith(short.choices[0].text)
    text = full.choices[0].text
    stop = text[4:6]
    assert len(stop) == 2
    stopped = complete(served, "b", PROMPTS[3], stop=[stop])
    assert stopped.choices[0].text == text[: text.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_sampling_with_a_seed_is_repeatable(served):
    runs = [served["client"].completions.create(model="a", prompt="abc", max_tokens=8, temperature=1.0,
                                                seed=7).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("body, status, words", [
    ("{not json", 400, "not valid JSON"),
    ('{"model": "nope", "prompt": "x"}', 404, "'nope' does not exist"),
    ('{"model": "a", "prompt": "x", "max_tokens": -3}', 400, "'max_tokens' must be at least 1"),
    ('{"model": "a"}', 400, "'prompt' is required"),
    ('{"model": "a", "prompt": "x", "temperature": "hot"}', 400, "'temperature' must be a number"),
    ('{"prompt": "x"}', 400, "'model' is required"),
    ('[]', 400, "must be a JSON object"),
])
def test_bad_completion_requests_get_4xx_json(served, body, status, words):
    response = httpx.post(served["url"] + "/v1/completions", content=body,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == status
    assert words in response.json()["error"]["message"]


@pytest.mark.parametrize("body, words", [
    ({"model": "a"}, "'messages' is required"),
    ({"model": "a", "messages": [{"role": "wizard", "content": "x"}]}, "role in"),
    ({"model": "a", "messages": [{"role": "user", "content": 3}]}, "content must be a string"),
])
def test_bad_chat_requests(served, body, words):
    response = httpx.post(served["url"] + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400 and words in response.json()["error"]["message"]


def test_openai_client_sees_errors_with_messages(served):
    client = served["client"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="zzz", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="a", prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="the limit is 512 \\(max_prompt_tokens\\)"):
        client.completions.create(model="a", prompt="x" * 600, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="at most 512"):
        client.completions.create(model="a", prompt="x" * 500, max_tokens=20)
    response = httpx.get(served["url"] + "/v1/nothing-here", timeout=60)
    assert response.status_code == 404 and "error" in response.json()
    # and the server is still fine afterwards
    assert complete(served, "a", "ok").choices[0].text is not None


def test_binds_loopback_by_default_and_checks_adapter_specs(served, tmp_path):
    from deltatune.cli import build_parser

    assert served["url"].startswith("http://127.0.0.1:")
    assert build_parser().parse_args(["serve", "--model", "m"]).host == "127.0.0.1"
    with pytest.raises(dt.DeltatuneError, match="expected NAME=DIR"):
        parse_adapter_specs(["justaname"])
    with pytest.raises(dt.DeltatuneError, match="adapter directory not found"):
        parse_adapter_specs([f"x={tmp_path / 'missing'}"])
    with pytest.raises(dt.DeltatuneError, match="given twice"):
        parse_adapter_specs([f"x={tmp_path}", f"x={tmp_path}"])
    json.dumps(served["client"].models.list().model_dump())  # the listing is plain JSON


def test_eos_ends_a_row_unless_ignored():
    """A model that always says EOS: rows stop at once, or run to max_tokens with ignore_eos,
    even next to each other in one batch."""
    from fastapi.testclient import TestClient

    model, tokenizer = tiny_chat_llama()
    with torch.no_grad():  # make the model's first greedy token after "hi" its end-of-sequence
        first = model(input_ids=torch.tensor([tokenizer("hi").input_ids])).logits[0, -1].argmax()
    model.generation_config.eos_token_id = int(first)
    app = build_app(model, tokenizer, base_name="tiny", batch_wait_ms=200, engine="static")
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 5, "temperature": 0}
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        stopped, ignored = pool.map(lambda extra: client.post("/v1/completions", json={**body, **extra}).json(),
                                    [{}, {"ignore_eos": True}])
    assert stopped["usage"]["completion_tokens"] == 0 and stopped["choices"][0]["finish_reason"] == "stop"
    assert ignored["usage"]["completion_tokens"] == 5 and ignored["choices"][0]["finish_reason"] == "length"
    assert app.state.engine.batches_run == 1
