"""--resume continues exactly: an interrupted + resumed run ends bit-identical to an
uninterrupted one (delta, optimizer moments, RNG for dropout, data position, schedule)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from deltatune.cli import main
from deltatune.training.loop import train_from_config
from tiny_runs import one_thread  # noqa: F401
from tiny_runs import causal_config, classification_config, tiny_bert_dir, tiny_llama_dir

pytestmark = pytest.mark.usefixtures("one_thread")


class Interrupt(Exception):
    pass


def interrupt_at(step_to_stop: int):
    def on_step(step: int) -> None:
        if step == step_to_stop:
            raise Interrupt(f"killed after step {step}")
    return on_step


def weights(run_dir):
    return load_file(str(run_dir / "adapter_model.safetensors"))


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"


@pytest.mark.parametrize("kind", ["causal-lm", "classification"])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, kind):
    if kind == "causal-lm":
        # LoRA dropout draws from the RNG every step; grad_accum 2 crosses the epoch boundary.
        make = lambda root, model: causal_config(root, model, rows=12, max_steps=8, grad_accum=2,
                                                 save_every=2, eval_every=3, keep_checkpoints=2)
        model_dir, extra = tiny_llama_dir(tmp_path), ["method.dropout=0.1"]
    else:
        make = lambda root, model: classification_config(root, model, rows=40, epochs=2,
                                                         save_every=2, schedule="cosine")
        model_dir, extra = tiny_bert_dir(tmp_path), ["method.dropout=0.1", "train.weight_decay=0.1"]
    config = make(tmp_path / "cfg", model_dir)
    whole = tmp_path / "whole"
    broken = tmp_path / "broken"
    summary = train_from_config(str(config), [f"output_dir={whole}", *extra])
    total = summary["steps"]
    assert total >= 8
    stop = total // 2
    with pytest.raises(Interrupt):
        train_from_config(str(config), [f"output_dir={broken}", *extra], on_step=interrupt_at(stop))
    assert not broken.exists()  # nothing is published until the run completes
    resumed = train_from_config(str(config), [f"output_dir={broken}", *extra], resume=True)
    assert resumed["steps"] == total
    assert_bit_identical(weights(whole), weights(broken))
    # The log reads like one run: every step once, in order, same losses as the whole run.
    steps = [r["step"] for r in map(json.loads, (broken / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(1, total + 1))
    losses = lambda d: [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses(whole) == losses(broken)


def test_resume_changes_nothing_when_the_interruption_missed_no_step(tmp_path):
    """Sanity check that the comparison above can fail: a different seed gives other weights."""
    config = classification_config(tmp_path / "cfg", tiny_bert_dir(tmp_path), rows=24, max_steps=3)
    a = train_from_config(str(config), [f"output_dir={tmp_path / 'a'}"])
    b = train_from_config(str(config), [f"output_dir={tmp_path / 'b'}", "train.seed=1"])
    assert a["steps"] == b["steps"] == 3
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


def test_interrupted_run_needs_resume_or_overwrite(tmp_path, capsys):
    config = classification_config(tmp_path / "cfg", tiny_bert_dir(tmp_path), rows=24, max_steps=4,
                                   save_every=1)
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        train_from_config(str(config), [f"output_dir={out}"], on_step=interrupt_at(2))
    capsys.readouterr()
    assert main(["train", str(config), f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and "interrupted" in err
    assert main(["train", str(config), f"output_dir={out}", "--resume"]) == 0
    assert (out / "summary.json").is_file()


def test_resume_without_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    config = classification_config(tmp_path / "cfg", tiny_bert_dir(tmp_path), rows=16, max_steps=2)
    capsys.readouterr()
    assert main(["train", str(config), f"output_dir={tmp_path / 'none'}", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint" in err and str(tmp_path / "none") in err


def test_checkpoints_are_rotated_and_loadable_as_adapters(tmp_path):
    from deltatune import load_adapter, load_model

    config = classification_config(tmp_path / "cfg", tiny_bert_dir(tmp_path), rows=32, max_steps=6,
                                   save_every=2, keep_checkpoints=2)
    out = tmp_path / "run"
    train_from_config(str(config), [f"output_dir={out}"])
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-4", "step-6"]
    # The last checkpoint's delta is the final delta, and it loads as an ordinary adapter.
    assert_bit_identical(load_file(str(out / "checkpoints/step-6/adapter/adapter_model.safetensors")),
                         weights(out))
    model, _ = load_model(str(tmp_path / "tiny-bert"), task="classification")
    load_adapter(model, out / "checkpoints/step-6/adapter")
