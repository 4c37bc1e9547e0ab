"""BitFit (no PEFT counterpart): which biases train, the file in deltatune's own BITFIT format,
merge into the biases and back, a fresh delta is the base, and the loss falls."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_trainable, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from safetensors.torch import load_file

import deltatune as dt


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_every_bias_outside_the_head_trains_and_nothing_else():
    model = dt.apply(tiny_bert(), dt.BitFitConfig())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    offsets = [n for n in trainable if n.endswith("bias_delta")]
    # per layer: query, key, value, attention.output.dense and its LayerNorm, intermediate,
    # output.dense and its LayerNorm = 8; plus the embeddings' LayerNorm and the pooler
    assert len(offsets) == 2 * 8 + 2
    assert [n for n in trainable if not n.endswith("bias_delta")] == [
        "classifier.deltas.default.bias", "classifier.deltas.default.weight"]  # the head, whole


def test_the_file_is_deltatune_s_own_and_reloads_exactly(tmp_path):
    model = dt.apply(tiny_gpt2(), dt.BitFitConfig()).eval()
    randomize_trainable(model)
    ids = token_batch()
    expected = logits(model, ids)
    dt.save_adapter(model, tmp_path / "bitfit")
    saved = json.loads((tmp_path / "bitfit" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BITFIT"
    tensors = load_file(tmp_path / "bitfit" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.transformer.") and k.endswith(".bias_delta") for k in tensors)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.bias_delta"].shape == (192,)
    again = dt.load_adapter(tiny_gpt2(), tmp_path / "bitfit").eval()
    assert torch.equal(logits(again, ids), expected)
    assert dt.inspect_adapter(tmp_path / "bitfit")["method"] == "bitfit"


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_merge_adds_the_offsets_to_the_biases_and_unmerge_takes_them_out(build):
    model = dt.apply(build(), dt.BitFitConfig()).eval()
    randomize_trainable(model)
    ids = token_batch()
    expected = logits(model, ids)
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.bias")}
    dt.merge(model)
    assert (logits(model, ids) - expected).abs().max().item() < 1e-5
    dt.unmerge(model)
    live = dict(model.named_parameters())
    assert max((live[n] - b).abs().max().item() for n, b in biases.items()) < 1e-6
    plain = dt.merge_and_unload(model)
    assert not any(isinstance(m, dt.deltas.DeltaLayer) for m in plain.modules())
    assert (logits(plain, ids) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_a_fresh_delta_is_the_base_and_the_loss_falls(build):
    model = dt.apply(build(), dt.BitFitConfig())
    ids = token_batch(4, 9)
    with dt.disable_adapters(model):
        base = logits(model, ids)
    assert torch.equal(logits(model, ids), base)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    labels = torch.zeros(4, dtype=torch.long) if build is tiny_bert else ids
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.99 and losses == sorted(losses, reverse=True), losses


def test_a_model_without_biases_is_refused_in_one_line():
    with pytest.raises(dt.DeltatuneError, match="LlamaForCausalLM has no bias terms to train") as info:
        dt.apply(tiny_llama(), dt.BitFitConfig())
    assert "\n" not in str(info.value)
    with pytest.raises(dt.DeltatuneError, match="BitFitConfig.target_modules: \\['nothing'\\] matched no"):
        dt.apply(tiny_bert(), dt.BitFitConfig(target_modules=["nothing"]))
    with pytest.raises(dt.DeltatuneError, match="BitFitConfig.target_modules"):
        dt.BitFitConfig(target_modules=[])


def test_chosen_modules_only():
    model = dt.apply(tiny_bert(), dt.BitFitConfig(target_modules=["query", "value"]))
    offsets = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias_delta")]
    assert len(offsets) == 4 and all(".query." in n or ".value." in n for n in offsets)
