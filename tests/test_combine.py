"""combine_adapters: linear / cat / svd combinations of LoRA adapters, checked on outputs and ΔW."""
from __future__ import annotations

import pytest
import torch
from conftest import randomize_trainable, tiny_llama, token_batch

import deltatune as dt
from deltatune.methods.lora import lora_layers


def two_lora(rank_b: int = 2, alpha_b: float = 3.0):
    """Adapters a (r=4, alpha=8, q/v) and b (different rank, alpha and modules), random weights."""
    model = tiny_llama()
    dt.apply(model, dt.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), "a")
    randomize_trainable(model, seed=3, std=0.2)
    dt.apply(model, dt.LoraConfig(r=rank_b, alpha=alpha_b, target_modules=["v_proj", "down_proj"]), "b")
    randomize_trainable(model, seed=4, std=0.2)
    return model


def run(model, name, ids=None):
    ids = token_batch(2, 6) if ids is None else ids
    if name is None:
        with torch.no_grad(), dt.disable_adapters(model):
            return model(input_ids=ids).logits
    dt.set_adapter(model, name)
    with torch.no_grad():
        return model(input_ids=ids).logits


def weighted_delta(layer, weights: dict[str, float]) -> torch.Tensor:
    return sum(w * layer.delta_weight(n).double() for n, w in weights.items() if n in layer.deltas)


def test_linear_of_one_adapter_with_weight_one_equals_it():
    model = two_lora()
    dt.combine_adapters(model, ["a"], [1.0], how="linear", new_name="copy")
    torch.testing.assert_close(run(model, "copy"), run(model, "a"), rtol=0, atol=1e-5)
    assert (run(model, "a") - run(model, None)).abs().max() > 1e-2


def test_linear_single_adapter_scales_its_delta():
    model = two_lora()
    dt.combine_adapters(model, ["a"], [-0.5], how="linear", new_name="scaled")
    for layer in lora_layers(model):
        if "a" in layer.deltas:
            torch.testing.assert_close(layer.delta_weight("scaled").double(),
                                       -0.5 * layer.delta_weight("a").double(), rtol=0, atol=1e-6)


def test_linear_of_two_is_the_weighted_sum_of_factors():
    model = two_lora(rank_b=4, alpha_b=4)  # linear needs equal ranks; scales: a 2.0, b 1.0
    factors = {"a": (0.6 * 2.0) ** 0.5, "b": (0.4 * 1.0) ** 0.5}
    dt.combine_adapters(model, ["a", "b"], [0.6, 0.4], how="linear", new_name="lin")
    for layer in lora_layers(model):
        new = layer.deltas["lin"]
        expected_A = sum(f * layer.deltas[n].lora_A.weight for n, f in factors.items() if n in layer.deltas)
        expected_B = sum(f * layer.deltas[n].lora_B.weight for n, f in factors.items() if n in layer.deltas)
        torch.testing.assert_close(new.lora_A.weight, expected_A, rtol=0, atol=1e-6)
        torch.testing.assert_close(new.lora_B.weight, expected_B, rtol=0, atol=1e-6)
        assert new.scale == 1.0


def test_cat_of_two_equals_sum_of_deltas():
    model = two_lora()
    weights = {"a": 0.7, "b": -1.3}
    dt.combine_adapters(model, list(weights), list(weights.values()), how="cat", new_name="cat")
    assert model.deltatune_state.configs["cat"].r == 6
    for layer in lora_layers(model):
        torch.testing.assert_close(layer.delta_weight("cat").double(), weighted_delta(layer, weights),
                                   rtol=0, atol=1e-6)
    # outputs: base + 0.7·ΔW_a − 1.3·ΔW_b, checked against merging the deltas into a fresh base
    reference = tiny_llama()
    with torch.no_grad():
        ref_modules = dict(reference.named_modules())
        for path, layer in [(p, m) for p, m in model.named_modules() if m in lora_layers(model)]:
            ref_modules[path].weight += weighted_delta(layer, weights).float()
        expected = reference(input_ids=token_batch(2, 6)).logits
    torch.testing.assert_close(run(model, "cat"), expected, rtol=0, atol=1e-5)


def test_svd_at_full_rank_reproduces_cat():
    model = two_lora()
    dt.combine_adapters(model, ["a", "b"], [0.7, -1.3], how="cat", new_name="cat")
    dt.combine_adapters(model, ["a", "b"], [0.7, -1.3], how="svd", new_name="svd6", rank=6)
    dt.combine_adapters(model, ["a", "b"], [0.7, -1.3], how="svd", new_name="svd1", rank=1)
    torch.testing.assert_close(run(model, "svd6"), run(model, "cat"), rtol=0, atol=1e-5)
    # rank 1 is a real truncation: it must differ, and be the best rank-1 fit of each ΔW
    assert (run(model, "svd1") - run(model, "cat")).abs().max() > 1e-4
    for layer in lora_layers(model):
        delta = layer.delta_weight("cat").double()
        s = torch.linalg.svdvals(delta)
        error = torch.linalg.matrix_norm(delta - layer.delta_weight("svd1").double())
        torch.testing.assert_close(error, s[1:].square().sum().sqrt(), rtol=1e-4, atol=1e-6)


def test_default_svd_rank_is_max_rank_and_active_adapter_is_kept():
    model = two_lora()
    dt.set_adapter(model, "a")
    dt.combine_adapters(model, ["a", "b"], [1, 1], how="svd", new_name="s")
    assert model.deltatune_state.configs["s"].r == 4
    assert dt.active_config(model)[0] == "a"


def test_combined_adapter_saves_and_reloads(tmp_path):
    model = two_lora()
    dt.combine_adapters(model, ["a", "b"], [0.5, 0.5], how="cat", new_name="both")
    expected = run(model, "both")
    dt.save_adapter(model, tmp_path / "both", name="both")
    fresh = dt.load_adapter(tiny_llama(), tmp_path / "both")
    torch.testing.assert_close(run(fresh, "default"), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(names=["a", "b"], weights=[1, 1], how="linear"), "needs equal ranks"),
    (dict(names=["a", "zz"], weights=[1, 1], how="cat"), "no adapter named 'zz'"),
    (dict(names=["a"], weights=[1, 2], how="cat"), "1 names but 2 weights"),
    (dict(names=["a"], weights=[1], how="ties"), "how must be one of"),
    (dict(names=["a"], weights=[1], how="svd", rank=0), "rank must be a positive integer"),
    (dict(names=["a"], weights=[1], how="cat", new_name="b"), "'b' already exists"),
])
def test_bad_requests(kwargs, message):
    model = two_lora()
    with pytest.raises(dt.DeltatuneError, match=message):
        dt.combine_adapters(model, **kwargs)


def test_non_lora_and_heads_are_refused():
    model = tiny_llama("classification")
    dt.apply(model, dt.LoraConfig(r=2, target_modules=["q_proj"]), "a")
    with pytest.raises(dt.DeltatuneError, match="trains whole modules"):
        dt.combine_adapters(model, ["a"], [1.0])
    full = tiny_llama()
    dt.apply(full, dt.FullConfig(), "f")
    with pytest.raises(dt.DeltatuneError, match="only LoRA adapters can be combined"):
        dt.combine_adapters(full, ["f"], [1.0])
