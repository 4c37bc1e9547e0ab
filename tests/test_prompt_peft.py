"""PEFT interop for the prompt methods on a tiny Llama with grouped-query attention: peft loads
what we save, we load what peft saves, with the same logits; the file layout is PEFT's."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_llama, token_batch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.methods.prefix import PrefixConfig
from deltatune.methods.prompt import PromptTuningConfig
from deltatune.methods.ptuning import PTuningConfig

import peft  # noqa: E402  (a test-only oracle)
N = 4
# tiny_llama: 2 layers, 4 query heads, 2 key/value heads, head_dim 16
PREFIX_WIDTH = 2 * 2 * 2 * 16

OURS = {
    "prompt": (lambda: PromptTuningConfig(num_virtual_tokens=N), (N, 64)),
    "ptuning-mlp": (lambda: PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=32), (N, 64)),
    "ptuning-lstm": (lambda: PTuningConfig(num_virtual_tokens=N, encoder="lstm"), (N, 64)),
    "prefix": (lambda: PrefixConfig(num_virtual_tokens=N), (N, PREFIX_WIDTH)),
    "prefix-projection": (lambda: PrefixConfig(num_virtual_tokens=N, projection=True), (N, PREFIX_WIDTH)),
    # PEFT has no LSTM for prefixes: it loads the folded file as plain prefixes, same logits
    "prefix-lstm": (lambda: PrefixConfig(num_virtual_tokens=N, projection="lstm"), (N, PREFIX_WIDTH)),
}
THEIRS = {
    "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    "ptuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N,
                                                encoder_hidden_size=32),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N),
    "prefix-projection": lambda: peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=32),
}


def perturb(parameters, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in parameters:
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)


def real_logits(model, ids):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=ids).logits[:, -ids.shape[1]:]  # peft keeps virtual positions


@pytest.mark.parametrize("method", OURS)
def test_peft_loads_ours_with_the_same_logits(method, tmp_path):
    make_config, shape = OURS[method]
    model = dt.apply(tiny_llama(), make_config())
    perturb(model.parameters())
    ids = token_batch()
    ours = real_logits(model, ids)
    with dt.disable_adapters(model):
        assert (real_logits(model, ids) - ours).abs().max().item() > 1e-2
    dt.save_adapter(model, tmp_path / "ours")
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_keys = {k: tuple(v.shape) for k, v in tensors.items() if not k.startswith("deltatune_reparam.")}
    assert peft_keys == {"prompt_embeddings": shape}  # plus, with an encoder, its weights for resuming
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    assert (real_logits(theirs, ids) - ours).abs().max().item() < 1e-5


@pytest.mark.parametrize("method", THEIRS)
def test_we_load_peft_saves_with_the_same_logits(method, tmp_path):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(), THEIRS[method]())
    perturb(theirs.parameters())
    theirs.eval()
    ids = token_batch()
    expected = real_logits(theirs, ids)
    theirs.save_pretrained(tmp_path / "theirs")
    model = dt.load_adapter(tiny_llama(), tmp_path / "theirs").eval()
    assert (real_logits(model, ids) - expected).abs().max().item() < 1e-5


def test_peft_prefix_layout_is_layer_then_key_value_then_kv_heads():
    """Reading PEFT's tensor as (n, layers, 2, kv_heads, head_dim): row [0, l, 0] is layer l's keys."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(), THEIRS["prefix"]())
    flat = theirs.prompt_encoder["default"].embedding.weight.detach()  # (n, layers·2·kv_heads·hd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cache = theirs.get_prompt(batch_size=1)
    split = flat.view(N, 2, 2, 2, 16)
    for layer in range(2):
        keys = cache.layers[layer].keys[0]  # (kv_heads, n, head_dim)
        values = cache.layers[layer].values[0]
        assert torch.equal(keys, split[:, layer, 0].transpose(0, 1))
        assert torch.equal(values, split[:, layer, 1].transpose(0, 1))


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_lstm_prefix_folds_at_save_and_loads_as_plain_prefixes(family, tmp_path):
    """save -> fold -> load: without the encoder's weights (as PEFT or an inference-only copy
    reads the file) the plain prefixes give the LSTM-made prefixes' logits."""
    from safetensors.torch import save_file
    from conftest import tiny_bert

    make = {"llama": tiny_llama, "bert": tiny_bert}[family]
    model = dt.apply(make(), PrefixConfig(num_virtual_tokens=N, projection="lstm")).eval()
    perturb(model.parameters())
    ids = token_batch()
    expected = real_logits(model, ids)
    dt.save_adapter(model, tmp_path / "lstm")
    weights = tmp_path / "lstm" / "adapter_model.safetensors"
    tensors = load_file(weights)
    assert any(k.startswith("deltatune_reparam.") and "lstm" in k for k in tensors)
    save_file({k: v for k, v in tensors.items() if not k.startswith("deltatune_reparam.")}, weights)
    folded = dt.load_adapter(make(), tmp_path / "lstm").eval()
    source = folded.deltatune_virtual_tokens.sources["default"]
    assert source.encoder is None  # plain prefixes now
    assert (real_logits(folded, ids) - expected).abs().max().item() < 1e-5
