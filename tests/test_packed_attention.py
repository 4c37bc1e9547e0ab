"""Padding-free training: one packed row per batch, each example attending only to itself
(packed_attention), must compute exactly what padded batches compute."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_gpt2, tiny_llama
from deltatune import LoraConfig, PromptTuningConfig, apply
from deltatune.data.dataset import Collator, Example
from deltatune.training.losses import batch_loss
from deltatune.training.packed_attention import (ONE_ROW, example_spans, packed_attention,
                                        supports_packed_attention)
from deltatune.training.loop import train_from_config
from tiny_runs import one_thread  # noqa: F401
from tiny_runs import causal_config, tiny_llama_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def _examples(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 100, (n,), generator=generator).tolist()
        out.append(Example(ids, [-100] * (n // 2) + ids[n // 2:]))
    return out


def test_example_spans_start_where_positions_restart():
    assert example_spans(torch.tensor([0, 1, 2, 0, 1, 0])) == [(0, 3), (3, 5), (5, 6)]
    assert example_spans(torch.tensor([5, 6, 7])) == [(0, 3)]  # no restart: one example


def test_packed_row_equals_each_example_alone_and_the_dense_mask():
    """Logits and gradients of a packed row (GQA model) match every example run on its own,
    and transformers' own block-diagonal-mask path."""
    model = tiny_llama().train()
    examples = _examples([5, 9, 3, 12])
    packed = Collator(0, packing=True, max_length=ONE_ROW)(examples)
    assert packed["input_ids"].shape == (1, 29) and "attention_mask" not in packed
    inputs = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
    with packed_attention(model) as used:
        ours = model(**inputs, use_cache=False).logits
        ours.square().mean().backward()
    assert used and model.config._attn_implementation == "sdpa"  # restored on exit
    ours_grad = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone = torch.cat([model(input_ids=torch.tensor([e.input_ids])).logits for e in examples], 1)
    dense = model(**inputs, use_cache=False).logits
    dense.square().mean().backward()
    assert torch.allclose(ours, alone, atol=1e-5)
    assert torch.allclose(ours, dense, atol=1e-5)
    for name, param in model.named_parameters():
        assert torch.allclose(ours_grad[name], param.grad, atol=1e-6), name


def test_padded_batches_inside_the_block_are_plain_sdpa():
    model = tiny_llama().eval()
    batch = Collator(0)(_examples([4, 10, 7]))
    batch.pop("labels")
    with packed_attention(model):
        inside = model(**batch).logits
    assert torch.equal(inside, model(**batch).logits)


def test_packed_loss_equals_padded_loss():
    model = tiny_llama().train()
    examples = _examples([6, 11, 4, 9])
    padded = batch_loss(model, "causal-lm", Collator(0)(examples))
    with packed_attention(model):
        packed = batch_loss(model, "causal-lm", Collator(0, packing=True, max_length=ONE_ROW)(examples))
    assert torch.allclose(packed, padded, atol=1e-5)


def test_only_plain_causal_sdpa_decoders_take_the_packed_path():
    assert supports_packed_attention(tiny_llama())
    assert not supports_packed_attention(tiny_gpt2())  # its attention gets no position ids
    eager = tiny_llama()
    eager.config._attn_implementation = "eager"
    assert not supports_packed_attention(eager)
    prompted = apply(tiny_llama(), PromptTuningConfig(num_virtual_tokens=3))
    assert not supports_packed_attention(prompted)  # virtual tokens go in front of every row
    with packed_attention(tiny_gpt2()) as used:
        assert not used


@pytest.mark.parametrize("checkpointing", [False, True])
def test_padding_free_training_matches_padded_training(tmp_path, checkpointing):
    """Same batches, same losses and same trained weights, with or without padding; with
    gradient checkpointing the attention re-run in backward is per-example too."""
    model_dir = tiny_llama_dir(tmp_path)
    config = causal_config(tmp_path / "cfg", model_dir, rows=16, max_steps=3)
    common = ["train.group_by_length=false", f"train.gradient_checkpointing={str(checkpointing).lower()}"]
    runs = {}
    for name, padding_free in (("padded", "false"), ("free", "true")):
        out = tmp_path / name
        runs[name] = train_from_config(str(config), [f"output_dir={out}",
                                                     f"train.padding_free={padding_free}", *common])
        runs[name]["losses"] = [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl"))
                                if "loss" in r]
        runs[name]["weights"] = load_file(str(out / "adapter_model.safetensors"))
    assert runs["free"]["losses"] == pytest.approx(runs["padded"]["losses"], abs=1e-5)
    for key, value in runs["padded"]["weights"].items():
        assert torch.allclose(runs["free"]["weights"][key], value, atol=1e-5), key
    assert len(runs["free"]["losses"]) == 3


def test_lora_gradients_through_packed_rows_match_padded_rows():
    model = apply(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules="all-linear")).train()
    for param in model.parameters():
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.02)  # B = 0 would hide errors in A's gradient
    examples = _examples([7, 3, 12])
    batch_loss(model, "causal-lm", Collator(0)(examples)).backward()
    padded = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    with packed_attention(model):
        batch_loss(model, "causal-lm", Collator(0, packing=True, max_length=ONE_ROW)(examples)).backward()
    for name, grad in padded.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, grad, atol=1e-6), name
