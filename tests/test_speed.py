"""Speed levers that must not change the arithmetic: frozen linear weights stored in bf16 give the
bit-identical loss and gradients under bf16 autocast, and free the fp32 copies."""
from __future__ import annotations

import copy

import pytest
import torch

import deltatune as dt
from byte_tokenizer import tiny_chat_llama
from deltatune.training.losses import batch_loss
from deltatune.training.speed import frozen_linear_weights, hold_frozen_weights_in_bf16


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = batch_loss(model, "causal-lm", batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", [dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
                                    dt.AdapterConfig(bottleneck_size=8)])
def test_frozen_weights_in_bf16_change_no_bit_under_autocast(method):
    model, _ = tiny_chat_llama()
    dt.apply(model, method)
    model.train()
    lean = copy.deepcopy(model)
    embedding = lean.get_input_embeddings().weight.clone()
    freed = hold_frozen_weights_in_bf16(lean)
    assert freed > 0 and not frozen_linear_weights(lean)  # every frozen linear weight is bf16 now
    assert lean.get_input_embeddings().weight.dtype == torch.float32  # tied head / embeddings kept
    assert torch.equal(lean.get_input_embeddings().weight, embedding)
    trainable = [p for p in lean.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    ids = torch.randint(3, 200, (2, 16))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    loss, grads = _loss_and_grads(model, batch)
    lean_loss, lean_grads = _loss_and_grads(lean, batch)
    assert torch.equal(loss, lean_loss)
    assert grads.keys() == lean_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], lean_grads[name]), name


def test_weights_that_train_stay_fp32():
    model, _ = tiny_chat_llama()
    dt.apply(model, dt.FullConfig())
    assert hold_frozen_weights_in_bf16(model) == 0
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("overrides, held", [(["train.bf16=true"], True), (["train.bf16=false"], False),
                                             (["train.bf16=true", "train.frozen_bf16=false"], False)])
def test_a_run_holds_frozen_weights_in_bf16_only_when_it_computes_in_bf16(tmp_path, monkeypatch,
                                                                          overrides, held):
    from deltatune.training import loop
    from tiny_runs import causal_config, tiny_llama_dir

    calls = []
    monkeypatch.setattr(loop, "hold_frozen_weights_in_bf16", lambda model: calls.append(
        hold_frozen_weights_in_bf16(model)))
    config = causal_config(tmp_path / "cfg", tiny_llama_dir(tmp_path), rows=8, max_steps=2)
    summary = loop.train_from_config(str(config), [f"output_dir={tmp_path / 'run'}", *overrides])
    assert summary["bf16"] is ("train.bf16=true" in overrides)
    assert (len(calls) == 1 and calls[0] > 0) is held and len(calls) == int(held)
