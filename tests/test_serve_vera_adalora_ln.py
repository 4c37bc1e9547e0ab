"""`deltatune serve` with VeRA, AdaLoRA and LN-tuning adapters beside the base: concurrent
requests for all of them share batches, and every reply is exactly the library's own greedy text."""
from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from byte_tokenizer import tiny_chat_llama

import deltatune as dt
from deltatune.serving.app import build_app
from deltatune.serving.server import ServerThread

PROMPTS = ["Hello there", "The capital of France is"]
# Adapters of different methods on one base take different layers (a layer carries one method)
CONFIGS = {"v": dt.VeraConfig(r=16, target_modules=["q_proj", "o_proj", "up_proj"]),
           "a": dt.AdaLoraConfig(init_r=4, target_r=2, target_modules=["k_proj", "v_proj", "down_proj"]),
           "n": dt.LNTuningConfig()}


@pytest.fixture(scope="module", params=["continuous", "static"])
def served(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("serve-vera-adalora-ln")
    base, tokenizer = tiny_chat_llama()
    base = base.double()  # batched and one-row runs agree to ~1e-12: greedy texts must match
    dirs = {}
    for seed, (name, config) in enumerate(CONFIGS.items()):
        model = dt.apply(copy.deepcopy(base), config)
        generator = torch.Generator().manual_seed(30 + seed)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.3)
        dirs[name] = dt.save_adapter(model, tmp / name)
    app = build_app(copy.deepcopy(base), tokenizer, dirs, base_name="tiny", max_batch=8, batch_wait_ms=300,
                    engine=request.param)
    server = ServerThread(app)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield {"client": client, "dirs": dirs, "base": base, "tokenizer": tokenizer}
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


def test_concurrent_requests_for_each_adapter_match_the_library(served):
    requests = [(name, prompt) for prompt in PROMPTS for name in (*CONFIGS, "tiny")]
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda r: served["client"].completions.create(
            model=r[0], prompt=r[1], max_tokens=10, temperature=0), requests))
    texts = {}
    for (name, prompt), result in zip(requests, results):
        expected = library_text(served, None if name == "tiny" else name, prompt)
        assert result.choices[0].text == expected, (name, prompt)
        texts[name] = expected if prompt == PROMPTS[0] else texts.get(name)
    assert len(set(texts.values())) == len(texts)  # every adapter changed the text
