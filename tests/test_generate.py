"""`deltatune generate`: chat template for chat models, greedy by default, seeded sampling, the
adapter's delta applied, only the new text returned."""
from __future__ import annotations

import pytest
import torch

from deltatune import LoraConfig, apply, load_model, save_adapter
from deltatune.cli import main
from deltatune.serving.generate import generate_text
from conftest import randomize_trainable
from tiny_runs import one_thread  # noqa: F401
from tiny_runs import tiny_llama_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model_dir(tmp_path):
    return tiny_llama_dir(tmp_path)


def reference(model, tokenizer, ids, **options):
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                         pad_token_id=tokenizer.pad_token_id, **options)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_greedy_uses_the_chat_template_and_returns_only_new_text(model_dir, capsys):
    model, tok = load_model(str(model_dir))
    templated = tok.apply_chat_template([{"role": "user", "content": "hi there"}],
                                        add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    raw = tok("hi there", return_tensors="pt")["input_ids"]
    assert templated.shape[1] > raw.shape[1]
    expected = reference(model, tok, templated, do_sample=False)
    assert generate_text(model, tok, "hi there", max_new_tokens=12) == expected
    assert main(["generate", "--model", str(model_dir), "--max-new-tokens", "12", "hi there"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    plain = reference(model, tok, raw, do_sample=False)
    assert generate_text(model, tok, "hi there", max_new_tokens=12, chat_template=False) == plain


def test_sampling_is_seeded(model_dir):
    model, tok = load_model(str(model_dir))
    runs = [generate_text(model, tok, "x", max_new_tokens=16, temperature=1.5, seed=s) for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # 16 tokens from a 259-way near-uniform distribution


def test_adapter_changes_the_answer_like_the_live_delta(model_dir, tmp_path, capsys):
    model, tok = load_model(str(model_dir))
    base_answer = generate_text(model, tok, "hello", max_new_tokens=12)
    apply(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_trainable(model, std=0.5)
    save_adapter(model, tmp_path / "adapter")
    live_answer = generate_text(model, tok, "hello", max_new_tokens=12)
    assert live_answer != base_answer
    assert main(["generate", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"),
                 "--max-new-tokens", "12", "hello"]) == 0
    assert capsys.readouterr().out.strip() == live_answer


@pytest.mark.parametrize("argv, message", [
    (["--adapter", "/nonexistent/adapter"], "/nonexistent/adapter: adapter directory not found"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
])
def test_bad_arguments_are_one_line_exit_2(model_dir, capsys, argv, message):
    assert main(["generate", "--model", str(model_dir), *argv, "hi"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("deltatune: error:") and message in err
