"""PEFT's `adapter_names=` keyword, in forward and generate(): the same rows as mixed_adapters."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, tiny_llama, token_batch
from test_mixed_batch import alone, left_padded, two_lora

import deltatune as dt

NAMES = ["a", "b", None]


def test_forward_rows_equal_each_adapter_alone_and_mixed_adapters():
    model = two_lora()
    ids = token_batch(len(NAMES), 7)
    with torch.no_grad():
        keyword = model(input_ids=ids, adapter_names=NAMES).logits
        with dt.mixed_adapters(model, NAMES):
            block = model(input_ids=ids).logits
    torch.testing.assert_close(keyword, block, rtol=0, atol=0)
    for i, name in enumerate(NAMES):
        with torch.no_grad():
            expected = alone(model, name, lambda: model(input_ids=ids[i:i + 1]).logits)
        torch.testing.assert_close(keyword[i:i + 1], expected, rtol=0, atol=1e-10)
    # rows really differ (row 0 through "a" is not what the active adapter "b" gives)
    dt.set_adapter(model, "b")
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    assert (plain[0] - keyword[0]).abs().max() > 1e-3
    # after the call the model is as before: active adapter "b" on every row
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=0)


def test_adapter_names_none_means_the_active_adapter():
    model = two_lora()
    ids = token_batch(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, adapter_names=None).logits,
                                   model(input_ids=ids).logits, rtol=0, atol=0)


def test_greedy_generate_equals_each_adapter_alone():
    model = two_lora()
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (5, 8, 3)]
    ids, mask = left_padded(prompts)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        keyword = model.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, **settings)
        with dt.mixed_adapters(model, NAMES):
            block = model.generate(input_ids=ids, attention_mask=mask, **settings)
    assert keyword.tolist() == block.tolist()
    for row, (prompt, name) in enumerate(zip(prompts, NAMES)):
        with torch.no_grad():
            expected = alone(model, name, lambda: model.generate(input_ids=torch.tensor([prompt]),
                                                                 **settings))
        assert keyword[row, ids.shape[1]:].tolist() == expected[0, len(prompt):].tolist()


def test_wrong_name_or_length_is_one_line_error():
    model = two_lora()
    ids = token_batch(3, 5)
    with pytest.raises(dt.DeltatuneError, match=r"^adapter_names: no adapter named 'c'"):
        model(input_ids=ids, adapter_names=["a", "c", None])
    # 1 name for 3 rows would divide the batch evenly; still refused (one name per row)
    for names in (["a"], ["a", "b"], ["a", "b", None, "a"]):
        with pytest.raises(dt.DeltatuneError, match=rf"^adapter_names: {len(names)} names for a "
                                                    r"batch of 3 rows"):
            model(input_ids=ids, adapter_names=names)
        with pytest.raises(dt.DeltatuneError, match=rf"{len(names)} names for a batch of 3 rows"):
            model.generate(input_ids=ids, adapter_names=names, max_new_tokens=2, pad_token_id=0)
    with pytest.raises(dt.DeltatuneError, match="one adapter name") as error:
        model(input_ids=ids, adapter_names="a")
    assert "\n" not in str(error.value)
    with pytest.raises(dt.DeltatuneError, match="already running a mixed batch"):
        with dt.mixed_adapters(model, NAMES):
            model(input_ids=ids, adapter_names=NAMES)
    # a refused call leaves nothing behind: the next plain and mixed calls work
    with torch.no_grad():
        model(input_ids=ids, adapter_names=NAMES)
        model(input_ids=ids)


def test_failing_forward_closes_the_block():
    """The forward raising inside the block must not leave rows mixed afterwards."""
    model = two_lora()
    dt.set_adapter(model, "a")
    ids = token_batch(3, 5)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with pytest.raises(Exception):
            model(input_ids=ids, adapter_names=NAMES, labels=torch.zeros(7, 2))  # bad labels
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def test_non_mixable_methods_are_refused():
    model = two_lora()
    dt.apply(model, dt.AdapterConfig(bottleneck_size=8), "bottleneck")
    ids = token_batch(2, 5)
    with pytest.raises(dt.DeltatuneError, match="adapter_names: adapter 'bottleneck' uses method "
                                                "'adapter', which cannot vary per batch row"):
        model(input_ids=ids, adapter_names=["a", "bottleneck"])
    prompt = tiny_llama()
    dt.apply(prompt, dt.PromptTuningConfig(num_virtual_tokens=4), "soft")
    with pytest.raises(dt.DeltatuneError, match="'soft' uses method 'prompt'"):
        prompt(input_ids=ids, adapter_names=["soft", None])
    with pytest.raises(dt.DeltatuneError, match="'soft' uses method 'prompt'"):
        prompt.generate(input_ids=ids, adapter_names=["soft", None], max_new_tokens=2, pad_token_id=0)
    full = tiny_llama()
    dt.apply(full, dt.FullConfig(), "full")
    with pytest.raises(dt.DeltatuneError, match="'full' uses method 'full'"):
        full(input_ids=ids, adapter_names=["full", None])


def test_deepcopy_keeps_working_and_merge_and_unload_removes_the_keyword():
    model = two_lora()
    ids = token_batch(3, 5)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=ids, adapter_names=NAMES).logits,
                                   model(input_ids=ids, adapter_names=NAMES).logits, rtol=0, atol=0)
    plain = dt.merge_and_unload(model)
    assert "generate" not in vars(plain) and not plain._forward_pre_hooks
