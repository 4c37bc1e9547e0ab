"""Mixed-adapter batches: each row through its own LoRA adapter equals running that row alone."""
from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, randomize_trainable, tiny_llama, token_batch

import deltatune as dt

NAMES = ["a", None, "b", "a"]


def two_lora(task: str = "causal-lm", dtype=torch.float64):
    """A tiny Llama (float64, so row-by-row and batched runs agree to ~1e-12) with adapters a, b
    on different modules and ranks, both with random non-zero weights."""
    model = tiny_llama(task, num_labels=3).to(dtype)
    dt.apply(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    randomize_trainable(model, seed=3, std=0.3)
    dt.apply(model, dt.LoraConfig(r=2, target_modules=["v_proj", "down_proj"]), "b")
    randomize_trainable(model, seed=4, std=0.3)
    return model


def alone(model, name, fn):
    """fn() with only adapter `name` (None: the base model)."""
    if name is None:
        with dt.disable_adapters(model):
            return fn()
    dt.set_adapter(model, name)
    return fn()


def left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("task", ["causal-lm", "classification"])
def test_forward_rows_equal_each_row_alone(task):
    model = two_lora(task)
    ids = token_batch(len(NAMES), 7)
    with torch.no_grad(), dt.mixed_adapters(model, NAMES):
        mixed = model(input_ids=ids).logits
    for i, name in enumerate(NAMES):
        with torch.no_grad():
            expected = alone(model, name, lambda: model(input_ids=ids[i:i + 1]).logits)
        torch.testing.assert_close(mixed[i:i + 1], expected, rtol=0, atol=1e-10)
    # the rows really differ by adapter (so the comparison could fail)
    with torch.no_grad(), dt.mixed_adapters(model, [None] * len(NAMES)):
        base = model(input_ids=ids).logits
    assert (mixed[0] - base[0]).abs().max() > 1e-3 and (mixed[2] - base[2]).abs().max() > 1e-3
    torch.testing.assert_close(mixed[1], base[1], rtol=0, atol=0)


def test_classification_head_per_row():
    """modules_to_save (the score head) also follows each row's adapter."""
    model = two_lora("classification")
    heads = {name: model.score.deltas[name].weight for name in ("a", "b")}
    assert not torch.equal(heads["a"], heads["b"])
    ids = token_batch(2, 5)
    with torch.no_grad(), dt.mixed_adapters(model, ["b", "a"]):
        mixed = model(input_ids=ids).logits
    with torch.no_grad():
        expected = alone(model, "a", lambda: model(input_ids=ids[1:]).logits)
    torch.testing.assert_close(mixed[1:], expected, rtol=0, atol=1e-10)


def test_greedy_generate_rows_keep_their_adapter():
    model = two_lora()
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (5, 8, 3, 6)]
    ids, mask = left_padded(prompts)
    settings = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad(), dt.mixed_adapters(model, NAMES):
        mixed = model.generate(input_ids=ids, attention_mask=mask, **settings)[:, ids.shape[1]:]
    outputs = []
    for prompt, name in zip(prompts, NAMES):
        one = torch.tensor([prompt])
        with torch.no_grad():
            expected = alone(model, name, lambda: model.generate(input_ids=one, **settings))
        outputs.append(expected[0, len(prompt):].tolist())
    assert mixed.tolist() == outputs
    assert outputs[0] != outputs[1] != outputs[2]  # each adapter leads somewhere else


def test_sampled_generate_with_copies_keeps_adapters():
    """num_return_sequences copies a row; every copy must keep that row's adapter."""
    model = two_lora()
    ids = token_batch(2, 4)
    settings = dict(max_new_tokens=6, do_sample=True, num_return_sequences=3, pad_token_id=0,
                    eos_token_id=None, top_k=0)
    with torch.no_grad(), dt.mixed_adapters(model, ["a", "b"]):
        torch.manual_seed(0)
        mixed = model.generate(input_ids=ids, **settings)
    assert mixed.shape[0] == 6
    # a batch with only adapter "a" in both rows consumes the random stream identically per row
    # position, so rows 0..2 must equal those of that run.
    with torch.no_grad(), dt.mixed_adapters(model, ["a", "a"]):
        torch.manual_seed(0)
        only_a = model.generate(input_ids=ids, **settings)
    assert mixed[:3].tolist() == only_a[:3].tolist()
    assert mixed[3:].tolist() != only_a[3:].tolist()


def test_active_adapter_and_merge_come_back_after_block():
    model = two_lora()
    ids = token_batch(2, 5)
    dt.set_adapter(model, "a")
    dt.merge(model)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with dt.mixed_adapters(model, [None, "b"]):
            mixed = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
        expected_b = alone(model, "b", lambda: model(input_ids=ids[1:]).logits)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-10)
    torch.testing.assert_close(mixed[1:], expected_b, rtol=0, atol=1e-10)
    with torch.no_grad(), dt.disable_adapters(model):
        torch.testing.assert_close(mixed[:1], model(input_ids=ids[:1]).logits, rtol=0, atol=1e-10)


def test_gradients_reach_only_the_rows_adapters():
    model = two_lora(dtype=torch.float32)
    ids = token_batch(2, 5)
    for name, p in model.named_parameters():
        p.requires_grad_(".deltas.a." in name or ".deltas.b." in name)
    with dt.mixed_adapters(model, ["a", None]):
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".deltas.a." in n)
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if ".deltas.b." in n)


def test_bad_names():
    model = two_lora()
    ids = token_batch(3, 5)
    with pytest.raises(dt.DeltatuneError, match="no adapter named 'c'"):
        with dt.mixed_adapters(model, ["a", "c"]):
            pass
    with pytest.raises(dt.DeltatuneError, match="3 rows but 2 adapter names"):
        with torch.no_grad(), dt.mixed_adapters(model, ["a", "b"]):
            model(input_ids=ids)
    with pytest.raises(dt.DeltatuneError, match="one adapter name"):
        with dt.mixed_adapters(model, "a"):
            pass


def test_non_lora_method_cannot_mix():
    model = two_lora()
    dt.apply(model, dt.AdapterConfig(bottleneck_size=8), "bottleneck")
    with pytest.raises(dt.DeltatuneError, match="'bottleneck' uses method 'adapter'.*only LoRA"):
        with dt.mixed_adapters(model, ["a", "bottleneck"]):
            pass
    full = tiny_llama()
    dt.apply(full, dt.FullConfig(), "full")
    with pytest.raises(dt.DeltatuneError, match="'full' uses method 'full'.*only LoRA"):
        with dt.mixed_adapters(full, ["full", None]):
            pass


def test_other_loaded_deltas_are_off_inside_the_block():
    """A bottleneck adapter active on the model must not leak into mixed LoRA rows."""
    model = two_lora()
    ids = token_batch(2, 5)
    with torch.no_grad(), dt.mixed_adapters(model, ["a", None]):
        before = model(input_ids=ids).logits
    dt.apply(model, dt.AdapterConfig(bottleneck_size=8), "bottleneck")
    randomize_trainable(model, seed=9, std=0.3)
    with torch.no_grad():
        with_bottleneck = model(input_ids=ids).logits
        with dt.mixed_adapters(model, ["a", None]):
            after = model(input_ids=ids).logits
    assert (with_bottleneck - before).abs().max() > 1e-3
    torch.testing.assert_close(after, before, rtol=0, atol=1e-10)
