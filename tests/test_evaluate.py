"""Metrics (accuracy, macro-F1, final-answer exact match, perplexity) and `deltatune eval` on a
base model with or without an adapter."""
from __future__ import annotations

import json
import math

import pytest
import torch

from deltatune.cli import main
from deltatune.data.dataset import Collator, Example
from deltatune.training.evaluation import (accuracy, evaluate_model, exact_match, final_answer, is_better,
                                macro_f1, split_prompt)
from deltatune.training.loop import train_from_config
from tiny_runs import one_thread  # noqa: F401
from tiny_runs import classification_config, tiny_bert_dir, tiny_llama_dir, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def test_accuracy_and_macro_f1_by_hand():
    predictions, labels = [0, 0, 1, 1, 2, 0], [0, 1, 1, 1, 2, 2]
    assert accuracy(predictions, labels) == pytest.approx(4 / 6)
    # class 0: tp1 fp2 fn0 -> 2/4; class 1: tp2 fp0 fn1 -> 4/5; class 2: tp1 fp0 fn1 -> 2/3
    assert macro_f1(predictions, labels, 3) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert macro_f1([1, 1], [1, 1], 2) == 1.0  # an absent class is not scored as 0


@pytest.mark.parametrize("text, answer", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("Total: 1,234 dollars #### 1,234", "1234"),
    ("so the answer is $18.00.", "18"),
    ("first 2, then 5, finally -3", "-3"),
    ("#### 0.5", "0.5"),
    ("no digits here", None),
])
def test_final_answer(text, answer):
    assert final_answer(text) == answer


def test_exact_match_compares_final_answers():
    refs = ["... #### 42", "... #### 1,000", "#### 7"]
    preds = ["The answer is 42.", "#### 1000", "I think 8"]
    assert exact_match(preds, refs) == pytest.approx(2 / 3)
    assert is_better("accuracy", 0.8, 0.7) and is_better("perplexity", 3.0, 4.0)
    assert not is_better("perplexity", 5.0, 4.0) and is_better("f1", 0.1, None)


def test_perplexity_is_exp_of_the_token_mean_loss(tmp_path):
    from deltatune import load_model

    model, tok = load_model(str(tiny_llama_dir(tmp_path)))
    examples = [Example(list(range(3, 3 + n)), list(range(3, 3 + n))) for n in (5, 9, 14)]
    metrics = evaluate_model(model, examples, "causal-lm", Collator(tok.pad_token_id), batch_size=2)
    total, count = 0.0, 0
    for e in examples:  # one example at a time, no padding: transformers' own mean loss
        ids = torch.tensor([e.input_ids])
        n = len(e.input_ids) - 1
        total += float(model(input_ids=ids, labels=ids).loss.detach()) * n
        count += n
    assert metrics["loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_split_prompt_gives_the_question_and_the_reference_answer(tmp_path):
    from deltatune import load_model
    from deltatune.config.run import DataConfig
    from deltatune.data.dataset import build_dataset

    _, tok = load_model(str(tiny_llama_dir(tmp_path)))
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}])
    dataset = build_dataset(DataConfig(eval=str(path), format="gsm8k"), tok, "causal-lm", "eval")
    prompt, reference = split_prompt(dataset[0])
    assert "What is 2+3?" in tok.decode(prompt) and final_answer(reference) == "5"
    assert "####" not in tok.decode(prompt)


def test_eval_cli_on_a_trained_adapter_matches_the_run_and_the_base_differs(tmp_path, capsys):
    model_dir = tiny_bert_dir(tmp_path)
    config = classification_config(tmp_path / "cfg", model_dir, rows=64, epochs=2, lr=1e-2)
    out = tmp_path / "run"
    summary = train_from_config(str(config), [f"output_dir={out}"])
    dev = str(tmp_path / "cfg" / "data" / "dev.jsonl")
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), "--adapter", str(out), "--data", dev]) == 0
    with_adapter = json.loads(capsys.readouterr().out)
    for key in ("accuracy", "f1", "loss"):
        assert with_adapter[key] == pytest.approx(summary["final_eval"][key], abs=1e-6)
    assert main(["eval", str(config), f"output_dir={out}"]) == 0  # the run config finds the run
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(summary["final_eval"]["loss"], abs=1e-6)
    assert main(["eval", "--model", str(model_dir), "--data", dev, "--task", "classification"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["adapter"] is None and base["loss"] != pytest.approx(with_adapter["loss"], abs=1e-4)


@pytest.mark.parametrize("bf16", [True, False])
def test_eval_cli_reproduces_the_run_in_its_own_precision(tmp_path, capsys, bf16):
    """Whatever `bf16: auto` would pick on this machine, eval of a run directory uses the
    precision (and eval batch size) the run recorded, so its numbers are the run's."""
    model_dir = tiny_bert_dir(tmp_path)
    config = classification_config(tmp_path / "cfg", model_dir, rows=32, epochs=1, lr=1e-2,
                                   batch_size=4, eval_batch_size=3)
    out = tmp_path / "run"
    summary = train_from_config(str(config), [f"output_dir={out}", f"train.bf16={str(bf16).lower()}"])
    assert summary["bf16"] is bf16
    capsys.readouterr()
    dev = str(tmp_path / "cfg" / "data" / "dev.jsonl")
    assert main(["eval", "--model", str(model_dir), "--adapter", str(out), "--data", dev]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(summary["final_eval"]["loss"], abs=1e-6)


def test_eval_cli_perplexity_of_a_base_causal_lm(tmp_path, capsys):
    model_dir = tiny_llama_dir(tmp_path)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello world, " * 20}] * 3)
    capsys.readouterr()
    assert main(["eval", "--model", str(model_dir), "--data", str(text), "--format", "text"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    # A random model over a 259-token vocabulary is near-uniform: perplexity close to 259.
    assert 100 < metrics["perplexity"] < 600


def test_eval_cli_bad_input_is_one_line(tmp_path, capsys):
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_bert_dir(tmp_path)), "--data",
                 str(tmp_path / "missing.jsonl"), "--task", "classification"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "missing.jsonl" in err.strip().splitlines()[-1]
    assert main(["eval", "--data", "x.jsonl"]) == 2
