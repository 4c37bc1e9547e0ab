"""Packed linear weights (serving/packed.py): the same numbers as F.linear, bit for bit, on a
float32 model, with and without LoRA adapters mixed per row; in-place weight changes are seen;
gradients, deepcopy and torch.save still work."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from byte_tokenizer import tiny_chat_llama
from conftest import randomize_trainable

import deltatune as dt
from deltatune.serving import packed
from deltatune.serving.packed import pack_linears

pytestmark = pytest.mark.skipif(not packed.available(), reason="needs PyTorch built with MKL")


@pytest.fixture(scope="module")
def models():
    base, tokenizer = tiny_chat_llama(seed=3)
    with_lora = copy.deepcopy(base)
    for seed, name in enumerate(["a", "b"]):
        dt.apply(with_lora, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]), name)
        randomize_trainable(with_lora, seed=seed, std=0.2)
    return base.eval(), with_lora.eval(), tokenizer


def test_same_logits_and_greedy_tokens_bit_for_bit(models):
    base, with_lora, tokenizer = models
    ids = torch.tensor([tokenizer("The capital of France is").input_ids] * 3)
    for model, names in ((base, None), (with_lora, ["a", None, "b"])):
        plain = copy.deepcopy(model)
        fast = copy.deepcopy(model)
        assert pack_linears(fast) >= 15  # 2 layers x 7 projections + the LM head
        with torch.inference_mode():
            kwargs = {"adapter_names": names} if names else {}
            want = plain(ids, **kwargs).logits
            got = fast(ids, **kwargs).logits
            assert torch.equal(got, want)
            gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, **kwargs)
            assert torch.equal(fast.generate(input_ids=ids, **gen), plain.generate(input_ids=ids, **gen))
        assert any(packed._PACKED in m.__dict__ for m in fast.modules())  # the packed path ran


def test_in_place_changes_gradients_copies(models):
    base = copy.deepcopy(models[0])
    pack_linears(base)
    layer = base.model.layers[0].mlp.up_proj
    x = torch.randn(5, layer.in_features)
    with torch.inference_mode():
        layer(x)
    with torch.no_grad():
        layer.weight.mul_(1.5)  # changed in place: packed again at the next call
    with torch.inference_mode():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight))
    out = layer(x.requires_grad_())  # autograd: the plain path, gradients flow
    out.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    clone = copy.deepcopy(base)  # the packed tensor is dropped, packed again on use
    with torch.inference_mode():
        assert torch.equal(clone.model.layers[0].mlp.up_proj(x), layer(x))
    torch.save(base.state_dict(), io.BytesIO())
    torch.save(base, io.BytesIO())


def test_a_weight_that_keeps_changing_goes_plain(models):
    base = copy.deepcopy(models[0])
    pack_linears(base)
    layer = base.model.layers[1].self_attn.o_proj
    x = torch.randn(2, layer.in_features)
    with torch.inference_mode():
        for _ in range(packed.MAX_CHANGES + 2):
            with torch.no_grad():
                layer.weight.add_(0.01)
            assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight))
    assert layer.__dict__[packed._PACKED].packed is None
