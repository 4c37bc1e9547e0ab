"""LoRA: exact parity with peft, merge/unmerge math, parameter counts, PEFT interop, bad input."""
from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import randomize_trainable, tiny_bert, tiny_gpt2, tiny_llama, token_batch

import deltatune as dt
from deltatune.methods.lora import delta_weight

CASES = {
    # family: (builder, our task, peft task_type, targets)
    "llama": (tiny_llama, "causal-lm", "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"]),
    "bert": (tiny_bert, "classification", "SEQ_CLS", ["query", "value", "intermediate.dense"]),
    "gpt2": (tiny_gpt2, "causal-lm", "CAUSAL_LM", ["c_attn", "c_proj"]),
}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def lora_pair(family: str, r: int = 4, alpha: float = 8, rslora: bool = False):
    """(ours, peft's) on identical base weights with identical LoRA weights."""
    build, task, task_type, targets = CASES[family]
    base = build()
    reference = copy.deepcopy(base)
    ours = dt.apply(base, dt.LoraConfig(r=r, alpha=alpha, target_modules=targets, use_rslora=rslora))
    randomize_trainable(ours)
    theirs = peft.get_peft_model(reference, peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, task_type=task_type,
        fan_in_fan_out=(family == "gpt2")))
    state = dt.get_method("lora").state_dict(ours, "default")
    result = peft.set_peft_model_state_dict(theirs, state)
    assert not result.unexpected_keys
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("family", CASES)
@pytest.mark.parametrize("rslora", [False, True])
def test_outputs_equal_peft_for_same_weights(family, rslora):
    ours, theirs = lora_pair(family, rslora=rslora)
    ids = token_batch()
    diff = (logits(ours, ids) - logits(theirs, ids)).abs().max().item()
    assert diff < 1e-6
    # and the adapter really changes the model (so the comparison could fail)
    with dt.disable_adapters(ours):
        assert (logits(ours, ids) - logits(theirs, ids)).abs().max().item() > 1e-4


@pytest.mark.parametrize("family", CASES)
def test_merge_equals_unmerged_and_unmerge_restores(family):
    ours, _ = lora_pair(family)
    ids = token_batch()
    before = {k: v.clone() for k, v in ours.state_dict().items() if "base_layer" in k}
    unmerged = logits(ours, ids)
    dt.merge(ours)
    assert (logits(ours, ids) - unmerged).abs().max().item() < 1e-5
    dt.unmerge(ours)
    after = ours.state_dict()
    assert max((after[k] - v).abs().max().item() for k, v in before.items()) < 1e-6
    assert (logits(ours, ids) - unmerged).abs().max().item() < 1e-5


def test_merge_and_unload_gives_plain_model():
    ours, _ = lora_pair("llama")
    ids = token_batch()
    expected = logits(ours, ids)
    plain = dt.merge_and_unload(ours)
    assert not any("lora" in n or "base_layer" in n for n, _ in plain.named_parameters())
    assert (logits(plain, ids) - expected).abs().max().item() < 1e-5


def test_delta_weight_math_for_conv1d_layout():
    A, B = torch.randn(3, 5), torch.randn(7, 3)
    assert torch.allclose(delta_weight(A, B, 2.0), 2.0 * B @ A)
    assert torch.allclose(delta_weight(A, B, 2.0, transposed=True), (2.0 * B @ A).T)


def test_fresh_lora_is_identity():
    base = tiny_llama()
    ids = token_batch()
    expected = logits(base, ids)
    dt.apply(base, dt.LoraConfig(target_modules="all-linear"))
    assert torch.equal(logits(base, ids), expected)


@pytest.mark.parametrize("family,r,targets", [
    ("llama", 4, ["q_proj", "v_proj"]),
    ("llama", 8, "all-linear"),
    ("llama", 2, r".*\.mlp\.(gate|up)_proj"),
    ("gpt2", 4, ["c_attn"]),
    ("bert", 8, ["query", "value"]),
])
def test_trainable_parameters_equal_closed_form(family, r, targets):
    build = CASES[family][0]
    model = build()
    d, layers = 64, 2
    head = sum(p.numel() for p in model.classifier.parameters()) if family == "bert" else 0
    kv = 32  # llama: 2 kv heads x head_dim 16
    per_layer = {
        ("llama", "q_proj"): r * (d + d), ("llama", "v_proj"): r * (d + kv),
        ("llama", "k_proj"): r * (d + kv), ("llama", "o_proj"): r * (d + d),
        ("llama", "gate_proj"): r * (d + 128), ("llama", "up_proj"): r * (d + 128),
        ("llama", "down_proj"): r * (128 + d),
        ("gpt2", "c_attn"): r * (d + 3 * d), ("bert", "query"): r * 2 * d, ("bert", "value"): r * 2 * d,
    }
    names = {"all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
             r".*\.mlp\.(gate|up)_proj": ["gate_proj", "up_proj"]}.get(targets if isinstance(targets, str) else "", targets)
    expected = layers * sum(per_layer[(family, n)] for n in names) + head
    _, total_before = dt.count_parameters(model)
    dt.apply(model, dt.LoraConfig(r=r, target_modules=targets))
    trainable, total = dt.count_parameters(model)
    assert trainable == expected
    assert total == total_before + expected - head + head  # the head copy adds `head` once more
    # everything that trains is a LoRA factor or the head copy
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert "lora_" in name or "classifier" in name, name


def test_all_linear_never_targets_the_head():
    model = tiny_llama()
    dt.apply(model, dt.LoraConfig(target_modules="all-linear"))
    assert type(model.lm_head).__name__ == "Linear"


# ------------------------------------------------------------------ files and PEFT interop
@pytest.mark.parametrize("family", CASES)
def test_deltatune_adapter_loads_in_peft(family, tmp_path):
    build, _, _, targets = CASES[family]
    ours, _ = lora_pair(family)
    dt.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "a").eval()
    ids = token_batch()
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", CASES)
def test_peft_adapter_loads_in_deltatune(family, tmp_path):
    build = CASES[family][0]
    _, theirs = lora_pair(family)
    theirs.save_pretrained(tmp_path / "p")
    ours = dt.load_adapter(build(), tmp_path / "p").eval()
    ids = token_batch()
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max().item() < 1e-5


def tiny_roberta():
    """A head with its own `dense` (classifier.dense), as every layer has."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    return RobertaForSequenceClassification(RobertaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=128, max_position_embeddings=256, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)).eval()


@pytest.mark.parametrize("build, names, exclude", [
    (tiny_bert, ["dense", "key", "query", "value"], ["pooler.dense"]),
    (tiny_roberta, ["dense", "key", "query", "value"], ["classifier.dense"]),
    (tiny_llama, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"], None),
    (tiny_gpt2, ["c_attn", "c_fc", "c_proj"], None),
])
def test_all_linear_is_saved_as_peft_short_names_and_peft_wraps_the_same_modules(build, names, exclude, tmp_path):
    import json

    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    from deltatune.methods.base import delta_layers
    from deltatune.methods.lora import LoraLayer

    ours = dt.apply(build(), dt.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_trainable(ours)
    ours.eval()
    dt.save_adapter(ours, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (saved["target_modules"], saved["exclude_modules"]) == (names, exclude)
    wrapped = sorted(p for p, layer in delta_layers(ours) if isinstance(layer, LoraLayer))
    # peft, the oracle: it wraps exactly these modules and computes the same outputs
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "a").eval()
    theirs_wrapped = sorted(p.removeprefix("base_model.model.") for p, m in theirs.named_modules()
                            if isinstance(m, PeftLoraLayer))
    assert theirs_wrapped == wrapped
    ids = token_batch()
    assert (logits(ours, ids) - logits(theirs, ids)).abs().max().item() < 1e-5
    again = dt.load_adapter(build(), tmp_path / "a")  # and deltatune reads it back the same
    assert sorted(p for p, layer in delta_layers(again) if isinstance(layer, LoraLayer)) == wrapped
    assert torch.equal(logits(ours, ids), logits(again, ids))


def test_save_load_round_trip_is_exact(tmp_path):
    ours, _ = lora_pair("llama")
    dt.save_adapter(ours, tmp_path / "a")
    again = dt.load_adapter(tiny_llama(), tmp_path / "a")
    ids = token_batch()
    assert torch.equal(logits(ours, ids), logits(again, ids))
    assert dt.count_parameters(again)[0] == dt.count_parameters(ours)[0]


def test_save_is_atomic_and_replaces(tmp_path):
    ours, _ = lora_pair("llama")
    dt.save_adapter(ours, tmp_path / "a")
    dt.save_adapter(ours, tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


# ------------------------------------------------------------------ bad input
def test_r_must_be_positive():
    with pytest.raises(dt.DeltatuneError, match=r"LoraConfig.r: must be a positive integer"):
        dt.LoraConfig(r=0)


def test_targets_matching_nothing_list_existing_names():
    with pytest.raises(dt.DeltatuneError, match=r"matched no linear module \(some that exist: .*q_proj"):
        dt.apply(tiny_llama(), dt.LoraConfig(target_modules=["qkv"]))


def test_unknown_method():
    with pytest.raises(dt.DeltatuneError, match=r"unknown method 'lorra'; known methods: .*lora"):
        dt.config_from_dict({"name": "lorra"})


def test_unknown_option_suggests_nearest():
    with pytest.raises(dt.DeltatuneError, match=r"method.rank: unknown option .*"):
        dt.config_from_dict({"name": "lora", "rank": 4})
    with pytest.raises(dt.DeltatuneError, match=r"did you mean 'alpha'"):
        dt.config_from_dict({"name": "lora", "alpah": 4})


def test_adapter_for_another_base_names_tensor_and_shapes(tmp_path):
    ours, _ = lora_pair("llama")
    dt.save_adapter(ours, tmp_path / "a")
    from transformers import LlamaConfig, LlamaForCausalLM
    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    with pytest.raises(dt.DeltatuneError, match=r"tensor 'base_model\.model\.model\.layers\.0\..*' has shape \(4, 64\) but this base model expects \(4, 32\)"):
        dt.load_adapter(other, tmp_path / "a")


def test_missing_and_corrupt_adapter_files(tmp_path):
    ours, _ = lora_pair("llama")
    dt.save_adapter(ours, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(dt.DeltatuneError, match=r"adapter_model.safetensors: corrupt or truncated"):
        dt.load_adapter(tiny_llama(), tmp_path / "a")
    weights.unlink()
    with pytest.raises(dt.DeltatuneError, match=r"adapter_model.safetensors: missing"):
        dt.load_adapter(tiny_llama(), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(dt.DeltatuneError, match=r"adapter_config.json: not valid JSON"):
        dt.load_adapter(tiny_llama(), tmp_path / "a")
    with pytest.raises(dt.DeltatuneError, match=r"adapter directory not found"):
        dt.load_adapter(tiny_llama(), tmp_path / "missing")


def test_pickle_is_never_loaded(tmp_path):
    directory = tmp_path / "evil"
    directory.mkdir()
    (directory / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}')
    marker = tmp_path / "ran"
    import pickle

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (directory / "adapter_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(dt.DeltatuneError, match=r"adapter_model.bin: pickle files are never loaded"):
        dt.load_adapter(tiny_llama(), directory)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["half", "a.b", "", "train"])
def test_unusable_adapter_names_are_one_line(name):
    with pytest.raises(dt.DeltatuneError, match=r"adapter name .* is not usable"):
        dt.apply(tiny_llama(), dt.LoraConfig(r=2), name=name)


def test_second_all_linear_adapter_joins_the_existing_wrappers():
    model = dt.apply(tiny_llama(), dt.LoraConfig(r=2))
    dt.apply(model, dt.LoraConfig(r=4), name="second")
    layers = [m for m in model.modules() if type(m).__name__ == "LoraLayer"]
    assert len(layers) == 14 and all(set(m.deltas) == {"default", "second"} for m in layers)
    assert dt.count_parameters(model)[0] == 2 * sum(
        4 * (m.base_layer.in_features + m.base_layer.out_features) for m in layers[:7])
