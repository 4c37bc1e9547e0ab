"""Model loading: the real presets, a GGUF file, local directories, architecture facts, errors."""
from __future__ import annotations

import time

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.models import _smollm2_gguf, architecture_of, resolve_model_path, transformer_layers


def test_minilm_preset_classification_single_and_pairs():
    model, tok = dt.load_model("minilm", task="classification", num_labels=3)
    assert model.config.model_type == "bert" and model.num_labels == 3
    single = tok(["a fine film"], return_tensors="pt")
    pair = tok(["a man sleeps"], ["a person rests"], return_tensors="pt")
    assert (pair["token_type_ids"] == 1).any() and not (single["token_type_ids"] == 1).any()
    with torch.no_grad():
        assert model(**pair).logits.shape == (1, 3)
    assert len(transformer_layers(model)) == 6


def test_smollm2_preset_loads_fast_from_cache_and_answers():
    resolve_model_path("smollm2-135m")  # converts once (~30 s) if the cache is cold
    start = time.perf_counter()
    model, tok = dt.load_model("smollm2-135m")
    assert time.perf_counter() - start < 5  # 2 s on an idle machine; CI cores are shared
    assert tok.pad_token is not None and model.config.pad_token_id is not None
    assert architecture_of(model).family == "llama" and len(transformer_layers(model)) == 30
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_gguf_path_and_local_directory(tmp_path, monkeypatch):
    # The preset's cache is a plain transformers directory; loading it by path works too.
    directory = resolve_model_path("smollm2-135m")
    model, _ = dt.load_model(directory, task="classification", num_labels=2)
    assert model.config.num_labels == 2 and model.config.pad_token_id is not None
    # a .gguf path shares the preset's one-time conversion
    assert resolve_model_path(str(_smollm2_gguf())) == directory
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    with pytest.raises(dt.DeltatuneError, match="GGUF file not found"):
        dt.load_model(str(tmp_path / "missing.gguf"))


def test_unknown_preset_lists_presets():
    with pytest.raises(dt.DeltatuneError, match=r"unknown model 'minilmm': not a preset \(minilm, smollm2-135m\)"):
        dt.load_model("minilmm")


def test_offline_hub_id_is_one_line():
    with pytest.raises(dt.DeltatuneError, match=r"cannot load model 'nobody/no-such-model'"):
        dt.load_model("nobody/no-such-model")


def test_bad_task():
    with pytest.raises(dt.DeltatuneError, match=r"task 'seq2seq' is not one of"):
        dt.load_model("minilm", task="seq2seq")


def test_saved_tiny_directory_round_trip(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "m")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    tok.save_pretrained(tmp_path / "m")
    model, tok = dt.load_model(str(tmp_path / "m"))
    assert architecture_of(model).family == "gpt2" and tok.pad_token is not None


def test_architecture_facts_point_at_real_modules():
    from deltatune.models import get_submodule
    for model in (tiny_llama(), tiny_gpt2()):
        arch = architecture_of(model)
        layer = transformer_layers(model)[0]
        for path in (arch.attention, arch.attention_output, arch.ffn_input, arch.ffn_output):
            assert get_submodule(layer, path) is not None, (arch.family, path)


def test_unsupported_family_names_it():
    from transformers import T5Config, T5ForConditionalGeneration
    model = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=64))
    with pytest.raises(dt.DeltatuneError, match=r"model type 't5' is not supported"):
        architecture_of(model)
