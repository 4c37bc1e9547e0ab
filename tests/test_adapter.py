"""Bottleneck adapters: identity at start, placement math, parameter counts, training, save/load,
named adapters, merge refusal, config errors — on tiny random models and the real presets."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_MODELS, VOCAB, randomize_trainable, tiny_bert, tiny_llama, token_batch

import deltatune as dt
from deltatune.methods.adapter import AdapterConfig, AdapterLayer, Bottleneck
from deltatune.methods.base import DeltaLayer

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
TASKS = {"llama": "causal-lm", "bert": "classification", "gpt2": "causal-lm"}


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


def bottlenecks(model, name="default"):
    return [layer.deltas[name] for layer in model.modules()
            if isinstance(layer, AdapterLayer) and name in layer.deltas]


# ------------------------------------------------------------------ identity and placement math
@pytest.mark.parametrize("family", TINY_MODELS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_fresh_adapter_computes_the_base_and_trained_one_does_not(family, placement):
    model = TINY_MODELS[family]()
    ids = token_batch()
    base = logits(model, ids)
    dt.apply(model, AdapterConfig(placement=placement, bottleneck_size=8))
    assert max_diff(logits(model, ids), base) < 1e-6
    randomize_trainable(model)  # non-zero up-projections: now the adapters must matter
    assert max_diff(logits(model, ids), base) > 1e-3
    with dt.disable_adapters(model):
        assert max_diff(logits(model, ids), base) < 1e-6


def _reference_bert_layer(layer, hidden, attn_adapter=None, ffn_adapter=None, parallel=None):
    """BERT's layer written out by hand, with adapters where each paper puts them."""
    attention = layer.attention
    context = attention.self(hidden)[0]
    projected = attention.output.dense.base_layer(context) if isinstance(
        attention.output.dense, DeltaLayer) else attention.output.dense(context)
    if attn_adapter is not None:
        projected = projected + attn_adapter(projected)
    attn_out = attention.output.LayerNorm(projected + hidden)
    inner = layer.intermediate(attn_out)
    dense = layer.output.dense.base_layer if isinstance(layer.output.dense, DeltaLayer) else layer.output.dense
    ffn = dense(inner)
    if ffn_adapter is not None:
        ffn = ffn + ffn_adapter(ffn)
    if parallel is not None:
        ffn = ffn + parallel(attn_out)  # reads the feed-forward block's input
    return layer.output.LayerNorm(ffn + attn_out)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_bert_layer_matches_hand_written_placement(placement):
    model = tiny_bert()
    dt.apply(model, AdapterConfig(placement=placement, bottleneck_size=8, scaling=2.5, activation="gelu"))
    randomize_trainable(model)
    layer = model.bert.encoder.layer[0]
    hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = layer(hidden)
        ours = ours[0] if isinstance(ours, tuple) else ours
        attn_delta = layer.attention.output.dense.deltas["default"] if placement == "houlsby" else None
        ffn_delta = layer.output.dense.deltas["default"]
        expected = _reference_bert_layer(
            layer, hidden, attn_adapter=attn_delta,
            ffn_adapter=None if placement == "parallel" else ffn_delta,
            parallel=ffn_delta if placement == "parallel" else None)
    assert max_diff(ours, expected) < 1e-5
    assert ffn_delta.scaling == 2.5


def test_bottleneck_is_down_activation_up_scaled():
    config = AdapterConfig(bottleneck_size=3, activation="tanh", scaling=0.5)
    module = Bottleneck(6, config, reads="output")
    torch.nn.init.normal_(module.adapter_up.weight)
    x = torch.randn(4, 6)
    down, up = module.adapter_down, module.adapter_up
    expected = 0.5 * (torch.tanh(x @ down.weight.T + down.bias) @ up.weight.T + up.bias)
    assert torch.allclose(module(x), expected, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_parallel_wraps_the_whole_mlp_when_it_holds_the_ffn(family):
    model = TINY_MODELS[family]()
    dt.apply(model, AdapterConfig(placement="parallel", bottleneck_size=4, scaling=4.0))
    randomize_trainable(model)
    layer = dt.models.transformer_layers(model)[1]
    assert isinstance(layer.mlp, AdapterLayer)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        expected = layer.mlp.base_layer(x) + 4.0 * layer.mlp.deltas["default"].adapter_up(
            torch.relu(layer.mlp.deltas["default"].adapter_down(x)))
        assert max_diff(layer.mlp(x), expected) < 1e-6


# ------------------------------------------------------------------ parameter counts
def closed_form(hidden: int, bottleneck: int, adapters: int, head: int) -> int:
    return adapters * (2 * hidden * bottleneck + bottleneck + hidden) + head


@pytest.mark.parametrize("family", TINY_MODELS)
@pytest.mark.parametrize("placement,per_layer", [("houlsby", 2), ("pfeiffer", 1), ("parallel", 1)])
@pytest.mark.parametrize("sizes,bottleneck", [({"bottleneck_size": 8}, 8), ({"reduction_factor": 4}, 16), ({}, 4)])
def test_trainable_parameters_equal_closed_form(family, placement, per_layer, sizes, bottleneck):
    model = TINY_MODELS[family]()
    head = sum(p.numel() for p in model.classifier.parameters()) if family == "bert" else 0
    dt.apply(model, AdapterConfig(placement=placement, **sizes))
    trainable, _ = dt.count_parameters(model)
    assert trainable == closed_form(64, bottleneck, 2 * per_layer, head)


def test_layers_restricts_adapters_and_checks_range():
    model = tiny_llama()
    dt.apply(model, AdapterConfig(placement="houlsby", bottleneck_size=8, layers=[1]))
    assert dt.count_parameters(model)[0] == closed_form(64, 8, 2, 0)
    layers = dt.models.transformer_layers(model)
    assert not any(isinstance(m, AdapterLayer) for m in layers[0].modules())
    assert isinstance(layers[1].self_attn.o_proj, AdapterLayer)
    with pytest.raises(dt.DeltatuneError, match=r"AdapterConfig\.layers: index 5 .* 2 layers"):
        dt.apply(tiny_llama(), AdapterConfig(layers=[0, 5]))


# ------------------------------------------------------------------ training
def _train(model, family, steps=6, lr=1e-2):
    ids = token_batch(batch=4, seq=8)
    labels = torch.tensor([0, 1, 1, 0]) if family == "bert" else ids
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    optimizer.zero_grad(set_to_none=False)
    model(input_ids=ids, labels=labels).loss.backward()  # fresh gradients after training
    return losses


@pytest.mark.parametrize("family,placement", [("bert", "houlsby"), ("llama", "parallel"),
                                              ("gpt2", "pfeiffer"), ("bert", "parallel")])
def test_training_moves_only_adapters_and_the_loss_falls(family, placement):
    model = TINY_MODELS[family]()
    dt.apply(model, AdapterConfig(placement=placement, bottleneck_size=8))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = _train(model, family)
    assert losses[-1] < losses[0]
    named = dict(model.named_parameters())
    adapter_params = [n for n in named if ".adapter_" in n]
    assert adapter_params and all(named[n].requires_grad for n in adapter_params)
    for n in adapter_params:
        assert named[n].grad is not None and named[n].grad.abs().max().item() > 0, n
    for n, before in frozen.items():
        assert torch.equal(named[n], before), n


# ------------------------------------------------------------------ save / load
@pytest.mark.parametrize("family,placement", [("bert", "parallel"), ("llama", "houlsby"), ("gpt2", "parallel")])
def test_save_load_round_trip_is_exact(tmp_path, family, placement):
    build = TINY_MODELS[family]
    config = AdapterConfig(placement=placement, reduction_factor=8, activation="silu",
                           layers=[1], scaling=2.0)
    model = dt.apply(build(), config)
    randomize_trainable(model)
    ids = token_batch()
    expected = logits(model, ids)
    dt.save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK_ADAPTER"
    assert {k: saved[k] for k in ("placement", "reduction_factor", "layers", "scaling", "activation")} == \
        {"placement": placement, "reduction_factor": 8, "layers": [1], "scaling": 2.0, "activation": "silu"}
    reloaded = dt.load_adapter(build(), tmp_path / "adapter")
    assert torch.equal(logits(reloaded, ids), expected)
    info = dt.inspect_adapter(tmp_path / "adapter")
    assert info["method"] == "adapter"
    assert info["parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_loading_onto_another_hidden_size_names_the_tensor(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = dt.apply(tiny_llama(), AdapterConfig(bottleneck_size=8))
    dt.save_adapter(model, tmp_path / "adapter")
    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         vocab_size=VOCAB)).eval()
    with pytest.raises(dt.DeltatuneError) as caught:
        dt.load_adapter(other, tmp_path / "adapter")
    message = str(caught.value)
    assert "\n" not in message
    assert "tensor 'base_model.model.model.layers." in message and ".adapter_" in message
    assert "(32" in message or "32)" in message  # the shape this base expects
    assert not any(isinstance(m, DeltaLayer) for m in other.modules())  # nothing half-applied


# ------------------------------------------------------------------ merge, named adapters
def test_merge_refuses_and_says_why():
    model = dt.apply(tiny_bert(), AdapterConfig())
    with pytest.raises(dt.DeltatuneError, match="cannot merge a adapter delta: .*nonlinearity") as caught:
        dt.merge(model)
    assert "\n" not in str(caught.value)
    with pytest.raises(dt.DeltatuneError, match="nonlinearity"):
        dt.merge_and_unload(model)


def test_two_named_adapters_switch_disable_and_delete():
    model = tiny_bert()
    ids = token_batch()
    base = logits(model, ids)
    # houlsby and parallel share BERT's output.dense wrapper: one reads its output, one the hook.
    dt.apply(model, AdapterConfig(placement="houlsby", bottleneck_size=8), name="a")
    randomize_trainable(model, seed=5)
    out_a = logits(model, ids)
    dt.apply(model, AdapterConfig(placement="parallel", bottleneck_size=4), name="b")
    randomize_trainable(model, seed=6)
    out_b = logits(model, ids)
    assert max_diff(out_a, out_b) > 1e-3 and max_diff(out_a, base) > 1e-3
    assert all(p.requires_grad == (".deltas.b." in n) for n, p in model.named_parameters())

    dt.set_adapter(model, "a")
    assert torch.equal(logits(model, ids), out_a)
    assert all(p.requires_grad == (".deltas.a." in n) for n, p in model.named_parameters())
    with dt.disable_adapters(model):
        assert max_diff(logits(model, ids), base) < 1e-6
    assert torch.equal(logits(model, ids), out_a)

    dt.set_adapter(model, "b")
    dt.delete_adapter(model, "a")
    assert torch.equal(logits(model, ids), out_b)
    assert not any(".deltas.a." in n for n, _ in model.named_parameters())
    dt.delete_adapter(model, "b")
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())
    assert not any(m._forward_pre_hooks for m in model.modules())  # no hook left behind
    assert max_diff(logits(model, ids), base) < 1e-6


def test_bf16_base_runs_with_float32_adapter():
    model = tiny_llama().to(torch.bfloat16)
    ids = token_batch()
    base = logits(model, ids)
    dt.apply(model, AdapterConfig(placement="parallel", bottleneck_size=8))
    assert bottlenecks(model)[0].adapter_down.weight.dtype == torch.float32
    out = logits(model, ids)
    assert out.dtype == torch.bfloat16 and torch.equal(out, base)


# ------------------------------------------------------------------ config errors
@pytest.mark.parametrize("options,field", [
    ({"placement": "after"}, "placement"),
    ({"bottleneck_size": 0}, "bottleneck_size"),
    ({"bottleneck_size": 8, "reduction_factor": 4}, "bottleneck_size"),
    ({"reduction_factor": 1.5}, "reduction_factor"),
    ({"activation": "softmax"}, "activation"),
    ({"layers": [0, -1]}, "layers"),
    ({"layers": []}, "layers"),
    ({"dropout": 1.0}, "dropout"),
    ({"scaling": "big"}, "scaling"),
])
def test_bad_config_names_the_field(options, field):
    with pytest.raises(dt.DeltatuneError, match=rf"^AdapterConfig\.{field}: ") as caught:
        AdapterConfig(**options)
    assert "\n" not in str(caught.value)


def test_run_config_typo_suggests_the_field():
    with pytest.raises(dt.DeltatuneError, match="did you mean 'bottleneck_size'"):
        dt.config_from_dict({"name": "adapter", "bottleneck_sise": 16})
    config = dt.config_from_dict({"name": "adapter", "placement": "pfeiffer", "bottleneck_size": 16})
    assert isinstance(config, AdapterConfig) and config.placement == "pfeiffer"


# ------------------------------------------------------------------ the real presets
@pytest.fixture(scope="module")
def minilm():
    return dt.load_model("minilm", task="classification", num_labels=2)


@pytest.fixture(scope="module")
def smollm2():
    return dt.load_model("smollm2-135m", task="causal-lm")


@pytest.mark.parametrize("preset", ["minilm", "smollm2"])
def test_presets_start_as_the_base_for_every_placement(preset, request):
    model, tokenizer = request.getfixturevalue(preset)
    batch = tokenizer(["a quietly moving film", "the plot never gets going at all"],
                      padding=True, return_tensors="pt")
    model.eval()
    base = logits(model, batch["input_ids"], attention_mask=batch["attention_mask"])
    head = sum(p.numel() for p in model.classifier.parameters()) if preset == "minilm" else 0
    for placement in PLACEMENTS:
        dt.apply(model, AdapterConfig(placement=placement), name=placement)
        out = logits(model, batch["input_ids"], attention_mask=batch["attention_mask"])
        assert max_diff(out, base) < 1e-6, placement
        hidden = model.config.hidden_size
        layers = model.config.num_hidden_layers * (2 if placement == "houlsby" else 1)
        assert dt.count_parameters(model)[0] == closed_form(hidden, hidden // 16, layers, head)
        dt.delete_adapter(model, placement)
    assert not any(isinstance(m, DeltaLayer) for m in model.modules())


def test_parallel_on_bert_gives_the_same_gradients_under_gradient_checkpointing():
    """The captured feed-forward input must be captured again when a checkpoint recomputes."""
    grads = []
    for checkpointing in (False, True):
        model = dt.apply(tiny_bert(), AdapterConfig(placement="parallel", bottleneck_size=8))
        randomize_trainable(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(input_ids=token_batch(), labels=torch.tensor([0, 1])).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
    assert any(g.abs().max() > 0 for n, g in grads[1].items() if "adapter_down" in n)
