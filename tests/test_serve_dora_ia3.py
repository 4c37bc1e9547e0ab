"""`deltatune serve` with a DoRA and an (IA)³ adapter: concurrent requests for both (and the base)
run as mixed per-row batches and give exactly the library's own greedy text for each."""
from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from byte_tokenizer import tiny_chat_llama
from conftest import randomize_trainable

import deltatune as dt
from deltatune.serving.app import build_app
from deltatune.serving.server import ServerThread

PROMPTS = ["Hello there", "The capital of France is", "1, 2, 3,"]


@pytest.fixture(scope="module", params=["continuous", "static"])
def served(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("serve-dora-ia3")
    base, tokenizer = tiny_chat_llama()
    base = base.double()  # batched and one-row runs agree to ~1e-12: greedy texts must match
    configs = {"d": dt.LoraConfig(r=4, target_modules=["q_proj", "o_proj", "up_proj"], use_dora=True),
               "i": dt.IA3Config()}  # k_proj, v_proj, down_proj: no layer shared with "d"
    dirs = {}
    for seed, (name, config) in enumerate(configs.items()):
        model = dt.apply(copy.deepcopy(base), config)
        randomize_trainable(model, seed=20 + seed, std=0.3)
        with torch.no_grad():  # magnitudes / vectors near their start, as training leaves them
            for pname, param in model.named_parameters():
                if "magnitude" in pname or "ia3_l" in pname:
                    param.copy_(param.abs() * 5 + 0.5 if "ia3_l" in pname else param.abs() * 20)
        dirs[name] = dt.save_adapter(model, tmp / name)
    app = build_app(copy.deepcopy(base), tokenizer, dirs, base_name="tiny", max_batch=8, batch_wait_ms=300,
                    engine=request.param)
    server = ServerThread(app)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield {"client": client, "engine": app.state.engine, "dirs": dirs, "base": base, "tokenizer": tokenizer}
    server.stop()


def library_text(served, adapter, prompt: str) -> str:
    model = copy.deepcopy(served["base"])
    if adapter is not None:
        dt.load_adapter(model, served["dirs"][adapter], name=adapter)
    tokenizer = served["tokenizer"]
    ids = tokenizer(prompt).input_ids
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def mixed_count(engine) -> int:
    """Batches (static engine) or decoding steps (continuous) whose rows used several adapters."""
    return engine.mixed_batches if hasattr(engine, "mixed_batches") else engine.batch.mixed_steps


def test_dora_and_ia3_requests_share_batches_and_match_the_library(served):
    engine = served["engine"]
    mixed_before = mixed_count(engine)
    requests = [(name, prompt) for prompt in PROMPTS for name in ("d", "i", "tiny")]
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda r: served["client"].completions.create(
            model=r[0], prompt=r[1], max_tokens=10, temperature=0), requests))
    texts = {}
    for (name, prompt), result in zip(requests, results):
        expected = library_text(served, None if name == "tiny" else name, prompt)
        assert result.choices[0].text == expected, (name, prompt)
        texts[name, prompt] = expected
    assert len({texts["d", PROMPTS[0]], texts["i", PROMPTS[0]], texts["tiny", PROMPTS[0]]}) == 3
    assert mixed_count(engine) > mixed_before
