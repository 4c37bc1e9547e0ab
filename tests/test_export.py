"""`deltatune merge`: a plain transformers directory that reloads with base + adapter outputs."""
from __future__ import annotations

import json

import pytest
import torch
from byte_tokenizer import tiny_chat_llama
from conftest import randomize_trainable, token_batch

import deltatune as dt
from deltatune.cli import main
from deltatune.methods import REGISTRY


def base_and_adapter(tmp_path, task: str = "causal-lm"):
    """A saved tiny base (with tokenizer), a saved LoRA adapter for it, and base+adapter logits."""
    from transformers import LlamaForSequenceClassification

    model, tokenizer = tiny_chat_llama()
    if task == "classification":
        model.config.num_labels = 3
        torch.manual_seed(1)
        model = LlamaForSequenceClassification(model.config).eval()
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    dt.apply(model, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_trainable(model, seed=3, std=0.2)
    dt.save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        expected = model(input_ids=token_batch(3, 7)).logits
        with dt.disable_adapters(model):
            base = model(input_ids=token_batch(3, 7)).logits
    assert (expected - base).abs().max() > 1e-2  # the adapter matters
    return tmp_path / "base", tmp_path / "adapter", expected


@pytest.mark.parametrize("task", ["causal-lm", "classification"])
def test_merged_directory_reloads_in_transformers(tmp_path, capsys, task):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    base, adapter, expected = base_and_adapter(tmp_path, task)
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "adapter:" in printed and "full model:" in printed and "% of the full model" in printed
    files = {f.name for f in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert "adapter_config.json" not in files and not any(f.endswith(".bin") for f in files)
    assert "deltatune_base" not in json.loads((out / "config.json").read_text())
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    reloaded = auto.from_pretrained(out).eval()
    with torch.no_grad():
        got = reloaded(input_ids=token_batch(3, 7)).logits
    assert (got - expected).abs().max().item() < 1e-5
    assert AutoTokenizer.from_pretrained(out)("hi").input_ids == AutoTokenizer.from_pretrained(base)("hi").input_ids
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_refuses_to_overwrite_without_flag(tmp_path, capsys):
    base, adapter, _ = base_and_adapter(tmp_path)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out)]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(args + ["--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_save_merged_library_call(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny_chat_llama()
    dt.apply(model, dt.LoraConfig(r=2, target_modules=["o_proj"]))
    randomize_trainable(model, seed=5, std=0.2)
    with torch.no_grad():
        expected = model(input_ids=token_batch()).logits
    dt.save_merged(model, tokenizer, tmp_path / "m")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(input_ids=token_batch()).logits
    assert (got - expected).abs().max().item() < 1e-5


def test_non_mergeable_methods_say_why(tmp_path, capsys):
    base, _, _ = base_and_adapter(tmp_path)
    full_dir = tmp_path / "full"
    model, _ = tiny_chat_llama()
    dt.apply(model, dt.FullConfig())
    dt.save_adapter(model, full_dir)
    cases = {"full": full_dir}
    for method in REGISTRY.values():  # every registered method that cannot merge
        if method.merge is None and method.name != "full":
            directory = tmp_path / f"nomerge-{method.name}"
            directory.mkdir()
            (directory / "adapter_config.json").write_text(json.dumps({"peft_type": method.config.peft_type}))
            cases[method.name] = directory
    capsys.readouterr()
    for name, directory in cases.items():
        out = tmp_path / f"out-{name}"
        assert main(["merge", "--model", str(base), "--adapter", str(directory), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "cannot merge" in err and REGISTRY[name].why_no_merge in err
        assert not out.exists()


def test_missing_adapter_directory(tmp_path, capsys):
    base, _, _ = base_and_adapter(tmp_path)
    assert main(["merge", "--model", str(base), "--adapter", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "adapter directory not found" in capsys.readouterr().err
