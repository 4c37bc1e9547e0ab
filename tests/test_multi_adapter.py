"""Several named adapters on one base: load next to each other, switch, disable, delete, train one."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_trainable, tiny_llama, token_batch

import deltatune as dt


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def saved_adapter(tmp_path, name: str, targets: list[str], seed: int):
    """A LoRA adapter with random (non-zero) weights saved to tmp_path/name; returns (dir, logits)."""
    model = tiny_llama()
    dt.apply(model, dt.LoraConfig(r=4, target_modules=targets))
    randomize_trainable(model, seed=seed, std=0.2)
    directory = dt.save_adapter(model, tmp_path / name)
    return directory, logits(model, token_batch())


@pytest.fixture
def two_adapters(tmp_path):
    dir_a, expected_a = saved_adapter(tmp_path, "a", ["q_proj", "v_proj"], seed=3)
    dir_b, expected_b = saved_adapter(tmp_path, "b", ["v_proj", "down_proj"], seed=4)
    model = tiny_llama()
    base = logits(model, token_batch())
    dt.load_adapter(model, dir_a, name="a")
    dt.load_adapter(model, dir_b, name="b")
    return model, {"a": expected_a, "b": expected_b, None: base}


def test_load_adds_next_to_loaded_and_newest_is_active(two_adapters):
    model, expected = two_adapters
    assert dt.adapter_names(model) == ["a", "b"]
    assert dt.active_config(model)[0] == "b"
    torch.testing.assert_close(logits(model, token_batch()), expected["b"], rtol=0, atol=1e-6)


def test_set_adapter_switches_outputs(two_adapters):
    model, expected = two_adapters
    for name in ("a", "b", "a"):
        dt.set_adapter(model, name)
        torch.testing.assert_close(logits(model, token_batch()), expected[name], rtol=0, atol=1e-6)
    assert (expected["a"] - expected["b"]).abs().max() > 1e-2  # the adapters really differ


def test_disable_adapters_gives_base_outputs_then_restores(two_adapters):
    model, expected = two_adapters
    dt.set_adapter(model, "a")
    with dt.disable_adapters(model):
        torch.testing.assert_close(logits(model, token_batch()), expected[None], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, token_batch()), expected["a"], rtol=0, atol=1e-6)
    assert (expected["a"] - expected[None]).abs().max() > 1e-2


def test_disable_adapters_while_merged(two_adapters):
    model, expected = two_adapters
    dt.set_adapter(model, "b")
    dt.merge(model)
    with dt.disable_adapters(model):
        torch.testing.assert_close(logits(model, token_batch()), expected[None], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, token_batch()), expected["b"], rtol=0, atol=1e-5)


def test_delete_adapter_keeps_the_other(two_adapters):
    model, expected = two_adapters
    dt.delete_adapter(model, "b")
    assert dt.adapter_names(model) == ["a"]
    assert not any(".deltas.b." in n for n, _ in model.named_parameters())
    dt.set_adapter(model, "a")
    torch.testing.assert_close(logits(model, token_batch()), expected["a"], rtol=0, atol=1e-6)
    with pytest.raises(dt.DeltatuneError, match="no adapter named 'b'"):
        dt.set_adapter(model, "b")
    dt.delete_adapter(model, "a")  # the last one: the plain modules come back
    assert not any(".deltas." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, token_batch()), expected[None], rtol=0, atol=1e-6)


def test_same_name_twice_is_refused(two_adapters, tmp_path):
    model, _ = two_adapters
    with pytest.raises(dt.DeltatuneError, match="'a' already exists"):
        dt.load_adapter(model, tmp_path / "a", name="a")


def test_training_one_adapter_leaves_the_others_untouched(two_adapters):
    model, _ = two_adapters
    dt.set_adapter(model, "b")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(".deltas.b." in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    model.train()
    ids = token_batch(4, 9)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(".deltas.b." in n for n in changed)
    for name, param in model.named_parameters():
        if ".deltas.b." not in name:  # adapter a and every base weight: bit-for-bit equal
            assert torch.equal(param, before[name]), name


def test_adapters_on_one_base_match_separate_models(two_adapters, tmp_path):
    """Loading b next to a gives the same b as loading it alone on a fresh base."""
    model, _ = two_adapters
    alone = dt.load_adapter(tiny_llama(), tmp_path / "b", name="b")
    dt.set_adapter(model, "b")
    torch.testing.assert_close(logits(model, token_batch(3, 5)), logits(alone, token_batch(3, 5)),
                               rtol=0, atol=1e-6)
    snapshot = copy.deepcopy(model)
    dt.delete_adapter(snapshot, "a")
    torch.testing.assert_close(logits(snapshot, token_batch(3, 5)), logits(alone, token_batch(3, 5)),
                               rtol=0, atol=1e-6)
