"""generate() with prompt tuning, P-tuning and prefix tuning on decoders: the KV cache, left
padding and sampling agree with plain full forward passes; the real SmolLM2 preset generates."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.methods.prefix import PrefixConfig
from deltatune.methods.prompt import PromptTuningConfig
from deltatune.methods.ptuning import PTuningConfig
from deltatune.methods.virtual_tokens import CONTROLLER_ATTR

CONFIGS = {
    "prompt": lambda n: PromptTuningConfig(num_virtual_tokens=n),
    "ptuning": lambda n: PTuningConfig(num_virtual_tokens=n, encoder="lstm", encoder_hidden_size=16),
    "prefix": lambda n: PrefixConfig(num_virtual_tokens=n),
    "prefix-projection": lambda n: PrefixConfig(num_virtual_tokens=n, projection=True),
}
DECODERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
NEW_TOKENS = 8
PROMPTS = [[5, 17, 99, 42, 8, 23], [61, 7], [33, 90, 12, 4]]


def adapted(method: str, family: str, n: int = 4):
    model = dt.apply(DECODERS[family](), CONFIGS[method](n)).eval()
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():  # large virtual tokens: a misplaced one changes the argmax
        for param in getattr(model, CONTROLLER_ATTR).parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def greedy_without_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """The reference: the model's own full forward pass over the whole sequence, every step."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
            logits[:, model.config.eos_token_id] = -torch.inf  # as min_new_tokens does
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("method", CONFIGS)
def test_cached_generate_equals_greedy_full_forward_passes(method, family):
    model = adapted(method, family)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        logits = model(input_ids=generated).logits
        with dt.disable_adapters(model):
            base_logits = model(input_ids=generated).logits
    assert torch.equal(generated, greedy_without_cache(model, ids, NEW_TOKENS))
    assert (logits - base_logits).abs().max().item() > 1e-2, "the virtual tokens changed nothing"


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("method", CONFIGS)
def test_batched_left_padded_generate_equals_one_by_one(method, family):
    model = adapted(method, family)
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        for row, prompt in enumerate(PROMPTS):
            single = torch.tensor([prompt])
            alone = model.generate(single, attention_mask=torch.ones_like(single), do_sample=False,
                                   max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
            assert batched[row, ids.shape[1]:].tolist() == alone[0, len(prompt):].tolist(), row


@pytest.mark.parametrize("method", CONFIGS)
def test_sampling_with_and_without_cache_draws_the_same_tokens(method):
    model = adapted(method, "llama")
    ids, mask = left_padded(PROMPTS)
    draws = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        with torch.no_grad():
            draws.append(model.generate(ids, attention_mask=mask, do_sample=True, top_k=20,
                                        use_cache=use_cache, max_new_tokens=NEW_TOKENS,
                                        min_new_tokens=NEW_TOKENS))
    assert torch.equal(draws[0], draws[1])


@pytest.fixture(scope="module")
def smollm2():
    return dt.load_model("smollm2-135m")


@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix"])
def test_real_smollm2_generates_and_cache_agrees(smollm2, method):
    base, tokenizer = smollm2
    torch.manual_seed(0)
    model = dt.apply(base, CONFIGS[method](8), name=method).eval()
    try:
        ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=6, min_new_tokens=6)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            assert len(out[0]) == ids.shape[1] + 6 and text.strip()
            # cached: prefill, then one new token against the cache; uncached: one full pass
            prefill = model(input_ids=ids, use_cache=True)
            step = model(input_ids=out[:, ids.shape[1]:ids.shape[1] + 1], cache=prefill.cache,
                         attention_mask=torch.ones(1, ids.shape[1] + 1, dtype=torch.long))
            full = model(input_ids=out[:, :ids.shape[1] + 1], use_cache=False).logits
        assert (step.logits[:, -1] - full[:, -1]).abs().max().item() < 1e-4
        assert (prefill.logits - full[:, :-1]).abs().max().item() < 1e-4
    finally:
        dt.delete_adapter(model, method)
