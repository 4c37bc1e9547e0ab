"""Runs over the method registry: every method gets the same contract checked on each family.

A new method is covered the moment it registers, and so is every named variant of one (e.g.
"dora" = lora with use_dora): default config applies on every family,
training moves only its own parameters, save/load round-trips, disabling gives the base,
and merge either matches the unmerged outputs or refuses with a reason.
"""
from __future__ import annotations

import pytest
import torch
from conftest import NOT_APPLICABLE, randomize_trainable, tiny_bert, tiny_gpt2, tiny_llama, token_batch

import deltatune as dt
from deltatune.methods import method_names

FAMILIES = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}
CASES = [(m, f) for m in sorted(method_names()) for f in FAMILIES if (m, f) not in NOT_APPLICABLE]


def outputs(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapted(method: str, family: str):
    model = FAMILIES[family]()
    config = dt.config_from_dict({"name": method})  # a variant's presets included
    return dt.apply(model, config)


@pytest.mark.parametrize("method,family", CASES)
def test_training_moves_only_the_delta(method, family):
    model = adapted(method, family).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "the method left nothing trainable"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        loss = model(input_ids=token_batch(seed=step)).logits.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    live = dict(model.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(live[name], before), f"frozen {name} changed"
    assert any(not torch.equal(live[n], before) for n, before in trainable.items())


@pytest.mark.parametrize("method,family", CASES)
def test_save_load_round_trip(method, family, tmp_path):
    model = adapted(method, family).eval()
    randomize_trainable(model)
    ids = token_batch()
    expected = outputs(model, ids)
    dt.save_adapter(model, tmp_path / "delta")
    again = dt.load_adapter(FAMILIES[family](), tmp_path / "delta").eval()
    assert (outputs(again, ids) - expected).abs().max().item() < 1e-5
    assert dt.inspect_adapter(tmp_path / "delta")["method"] == dt.get_method(method).name


@pytest.mark.parametrize("method,family", [c for c in CASES if c[0] != "full"])
def test_disable_gives_the_base_and_merge_is_exact_or_refused(method, family):
    base_outputs = outputs(FAMILIES[family]().eval(), token_batch())
    model = adapted(method, family).eval()
    randomize_trainable(model)
    ids = token_batch()
    unmerged = outputs(model, ids)
    with dt.disable_adapters(model):
        assert torch.allclose(outputs(model, ids), base_outputs, atol=1e-6)
    assert not torch.allclose(unmerged, base_outputs, atol=1e-4), "the delta changed nothing"
    if dt.get_method(method).merge is None:
        with pytest.raises(dt.DeltatuneError, match="cannot merge"):
            dt.merge(model)
    else:
        dt.merge(model)
        assert (outputs(model, ids) - unmerged).abs().max().item() < 1e-5
        dt.unmerge(model)
    assert (outputs(model, ids) - unmerged).abs().max().item() < 1e-5


@pytest.mark.parametrize("method,family", sorted(NOT_APPLICABLE))
def test_a_method_with_nothing_to_train_says_why(method, family):
    with pytest.raises(dt.DeltatuneError, match=NOT_APPLICABLE[(method, family)]):
        adapted(method, family)
