"""Mixed-adapter LoRA in one product (lora_rows): every row equals its adapter alone, whatever the
mix of ranks, rows without an adapter, DoRA beside plain LoRA, and after the adapter set changes."""
from __future__ import annotations

import pytest
import torch
from conftest import randomize_trainable, tiny_llama, token_batch
from torch import nn

import deltatune as dt
from deltatune.methods.lora import LoraConfig, LoraDelta, LoraLayer
from deltatune.methods.lora_rows import bank_of

IN, OUT = 16, 12


def random_delta(rank: int, seed: int, dora: bool = False, base: nn.Linear | None = None) -> LoraDelta:
    generator = torch.Generator().manual_seed(seed)
    delta = LoraDelta(IN, OUT, LoraConfig(r=rank, alpha=3 * rank, use_dora=dora)).double()
    with torch.no_grad():
        for param in (delta.lora_A.weight, delta.lora_B.weight):
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64))
    if dora:
        delta.init_magnitude(base.weight)
        with torch.no_grad():
            delta.lora_magnitude_vector.mul_(1.5)
    return delta.eval()


def layer_with(ranks: dict[str, int], dora: tuple[str, ...] = ()) -> LoraLayer:
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(IN, OUT).double()).eval()
    for seed, (name, rank) in enumerate(ranks.items()):
        layer.add_delta(name, random_delta(rank, seed, name in dora, layer.base_layer))
    return layer


def each_alone(layer: LoraLayer, names, x: torch.Tensor) -> torch.Tensor:
    """Row i through names[i] alone, on the plain (single adapter) path."""
    rows = []
    for i, name in enumerate(names):
        layer.active = name if name in layer.deltas else None
        rows.append(layer(x[i:i + 1]))
    layer.active = None
    return torch.cat(rows)


def mixed(layer: LoraLayer, names, x: torch.Tensor) -> torch.Tensor:
    layer.row_adapters = tuple(names)
    try:
        return layer(x)
    finally:
        layer.row_adapters = None


# one token per row (the masked product) and several (the gathered bmm)
@pytest.mark.parametrize("tokens", [1, 5])
def test_rows_equal_each_adapter_alone_with_mixed_ranks_and_base_rows(tokens):
    layer = layer_with({"r2": 2, "r8": 8, "r4": 4})
    # "elsewhere": an adapter of the model that does not touch this layer (its rows: the base)
    names = ["r8", None, "r2", "r4", "elsewhere", "r8", "r2"]
    x = torch.randn(len(names), tokens, IN, dtype=torch.float64)
    with torch.no_grad():
        got = mixed(layer, names, x)
        want = each_alone(layer, names, x)
        base = layer.base_layer(x)
    assert bank_of(layer).names == ("r2", "r8", "r4") and bank_of(layer).a_pad.shape == (4, 8, IN)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for row in (1, 4):  # rows without an adapter here are exactly the base output
        assert torch.equal(got[row], base[row])
    assert (got[0] - base[0]).abs().min() > 0  # and the others really moved


@pytest.mark.parametrize("tokens", [1, 3])
def test_dora_rows_beside_banked_rows(tokens):
    layer = layer_with({"lora": 4, "dora": 2}, dora=("dora",))
    names = ["dora", "lora", None, "dora"]
    x = torch.randn(len(names), tokens, IN, dtype=torch.float64)
    with torch.no_grad():
        got = mixed(layer, names, x)
        want = each_alone(layer, names, x)
    assert bank_of(layer).names == ("lora",)  # DoRA needs the base output: one adapter at a time
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_copies_of_a_row_keep_its_adapter():
    """generate() expands rows into consecutive copies (beams, num_return_sequences)."""
    layer = layer_with({"a": 3, "b": 5})
    x = torch.randn(6, 1, IN, dtype=torch.float64)
    with torch.no_grad():
        got = mixed(layer, ["b", None, "a"], x)
        want = each_alone(layer, ["b", "b", None, None, "a", "a"], x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("tokens", [1, 4])
def test_bank_follows_every_change_of_the_adapter_set(tokens):
    layer = layer_with({"a": 4, "b": 2})
    names = ["a", "b", "c", None]
    x = torch.randn(len(names), tokens, IN, dtype=torch.float64)

    def check() -> None:
        with torch.no_grad():
            torch.testing.assert_close(mixed(layer, names, x), each_alone(layer, names, x), rtol=0, atol=1e-12)

    check()
    first = bank_of(layer)
    assert bank_of(layer) is first  # nothing changed: the same stack, not rebuilt
    layer.add_delta("c", random_delta(6, 7))  # loaded
    check()
    del layer.deltas["a"]  # evicted: its rows fall back to the base
    check()
    layer.add_delta("a", random_delta(4, 8))  # the same name again, other weights
    check()
    with torch.no_grad():
        layer.deltas["b"].lora_B.weight.mul_(-2)  # changed in place (a training step, a load)
    check()
    layer.deltas["c"].lora_A.weight.data = layer.deltas["c"].lora_A.weight.data * 3  # replaced storage
    check()
    assert bank_of(layer).names == ("b", "c", "a") and bank_of(layer) is not first


def test_trainable_rows_under_autograd_get_gradients():
    """With grad enabled and trainable deltas the per-adapter path runs: same values, and the
    gradient reaches exactly the adapters whose rows were in the batch."""
    layer = layer_with({"a": 4, "b": 2, "idle": 3})
    for param in layer.deltas.parameters():
        param.requires_grad_(True)
    names = ["a", None, "b"]
    x = torch.randn(len(names), 2, IN, dtype=torch.float64)
    got = mixed(layer, names, x)
    with torch.no_grad():
        torch.testing.assert_close(got, mixed(layer, names, x), rtol=0, atol=1e-12)
    got.sum().backward()
    assert layer.deltas["a"].lora_B.weight.grad.abs().sum() > 0
    assert layer.deltas["b"].lora_B.weight.grad.abs().sum() > 0
    assert layer.deltas["idle"].lora_B.weight.grad is None


def test_model_reloading_an_adapter_under_the_same_name():
    """Evicting the last adapter unwraps the layers; loading one of the same name wraps new ones.
    The mixed batch must run through the new layers (the cached layer list is rebuilt)."""
    model = tiny_llama().double()
    ids = token_batch(3, 6)
    for seed in (3, 4):
        dt.apply(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
        randomize_trainable(model, seed=seed, std=0.3)
        with torch.no_grad():
            got = model(input_ids=ids, adapter_names=["a", None, "a"]).logits
            dt.set_adapter(model, "a")
            want = model(input_ids=ids).logits
            with dt.disable_adapters(model):
                base = model(input_ids=ids).logits
        torch.testing.assert_close(got[[0, 2]], want[[0, 2]], rtol=0, atol=1e-10)
        torch.testing.assert_close(got[1], base[1], rtol=0, atol=1e-10)
        dt.delete_adapter(model, "a")


def test_weights_made_inside_inference_mode():
    """Inference tensors keep no version counter: the bank still builds and serves them."""
    model = tiny_llama().double()
    ids = token_batch(2, 5)
    with torch.inference_mode():
        dt.apply(model, dt.LoraConfig(r=4, target_modules=["q_proj"]), "a")
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.3)
        got = model(input_ids=ids, adapter_names=["a", None]).logits
        want = model(input_ids=ids[:1]).logits
    torch.testing.assert_close(got[:1], want, rtol=0, atol=1e-10)


def test_serving_runs_an_inactive_adapter_without_switching():
    """The engine's batch of one adapter that is not the active one runs as a mixed batch: same
    rows as that adapter alone, and the active adapter is left as it was (no model walk)."""
    from deltatune.serving.scheduler import adapters_for

    model = tiny_llama().double()
    for seed, name in enumerate(("a", "b")):
        dt.apply(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), name)
        randomize_trainable(model, seed=seed, std=0.3)
    dt.set_adapter(model, "a")
    ids = token_batch(2, 6)
    with torch.no_grad(), adapters_for(model, ["b", "b"]):
        got = model(input_ids=ids).logits
    assert dt.deltas.delta_state(model).active == "a"
    with torch.no_grad():
        dt.set_adapter(model, "b")
        torch.testing.assert_close(got, model(input_ids=ids).logits, rtol=0, atol=1e-10)


def test_a_server_block_rebuilds_banks_on_module_changes_only():
    """Inside fixed_adapter_weights (the serving engine's forwards) a bank follows adapters loaded
    and evicted, not in-place edits of a weight (the server never makes them); outside, both."""
    from deltatune.methods.lora_rows import fixed_adapter_weights

    layer = layer_with({"a": 4, "b": 2})
    names = ["a", "b"]
    x = torch.randn(len(names), 1, IN, dtype=torch.float64)
    with torch.no_grad(), fixed_adapter_weights():
        first = bank_of(layer)
        layer.deltas["b"].lora_B.weight.mul_(-2)
        assert bank_of(layer) is first  # no per-weight check inside the block
        layer.add_delta("c", random_delta(6, 7))  # a load is a new module: seen
        torch.testing.assert_close(mixed(layer, names + ["c"], torch.cat([x, x[:1]])),
                                   each_alone(layer, names + ["c"], torch.cat([x, x[:1]])), rtol=0, atol=1e-12)
    with torch.no_grad():
        layer.deltas["a"].lora_A.weight.mul_(3)
        torch.testing.assert_close(mixed(layer, names, x), each_alone(layer, names, x), rtol=0, atol=1e-12)
