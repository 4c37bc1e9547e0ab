"""LoRA+ (train.loraplus_lr_ratio): B's learning rate is ratio x A's, parameters grouped as PEFT's
create_loraplus_optimizer groups them (peft is the oracle), the option reaches the trainer's
optimizer and the loss falls; for methods without B matrices it is one line, exit 2."""
from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from conftest import tiny_bert, tiny_llama
from safetensors.torch import load_file
from tiny_runs import one_thread  # noqa: F401
from tiny_runs import causal_config, tiny_llama_dir

import deltatune as dt
from deltatune.cli import main
from deltatune.config.run import TrainConfig
from deltatune.methods import lr_multipliers_for
from deltatune.training.loop import train_from_config
from deltatune.training.optimization import build_optimizer

import peft  # noqa: E402  (a test-only oracle)
from peft.optimizers import create_loraplus_optimizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
LR, RATIO = 1e-3, 16.0


def lr_by_name(model, optimizer, normalize=lambda n: n) -> dict[str, float]:
    by_id = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    return {normalize(n): by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id}


def ours_name(name: str) -> str:
    return name.replace(".deltas.default", "")


def peft_name(name: str) -> str:
    name = name.replace("base_model.model.", "").replace(".default", "")
    return re.sub(r"lora_magnitude_vector\.weight$", "lora_magnitude_vector", name)


@pytest.mark.parametrize("use_dora", [False, True])
def test_groups_and_learning_rates_are_peft_s(use_dora):
    config = dt.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=use_dora)
    model = dt.apply(tiny_llama(), config)
    multipliers = lr_multipliers_for(config, TrainConfig(loraplus_lr_ratio=RATIO))
    ours = lr_by_name(model, build_optimizer(model, LR, 0.0, multipliers), ours_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=use_dora))
    theirs = lr_by_name(reference, create_loraplus_optimizer(
        reference, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO), peft_name)
    assert ours == pytest.approx(theirs) and ours
    assert {v for k, v in ours.items() if ".lora_B." in k} == {LR * RATIO}
    assert {v for k, v in ours.items() if ".lora_A." in k} == {LR}
    if use_dora:  # a vector: with B, as PEFT puts it
        assert {v for k, v in ours.items() if "magnitude" in k} == {LR * RATIO}


def test_the_head_a_classifier_trains_keeps_lr_and_decay_rules():
    config = dt.LoraConfig(r=4, target_modules=["query", "value"])
    model = dt.apply(tiny_bert(), config)
    optimizer = build_optimizer(model, LR, 0.1, lr_multipliers_for(config, TrainConfig(loraplus_lr_ratio=RATIO)))
    lrs = lr_by_name(model, optimizer, ours_name)
    assert lrs["classifier.weight"] == pytest.approx(LR)
    assert lrs["classifier.bias"] == pytest.approx(LR * RATIO)  # a vector goes with B (PEFT's rule)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert decay[id(named["classifier.deltas.default.bias"])] == 0.0  # biases never decay
    assert decay[id(named["classifier.deltas.default.weight"])] == 0.1


def test_without_the_option_one_lr_for_all():
    config = dt.LoraConfig(r=4, target_modules=["q_proj"])
    model = dt.apply(tiny_llama(), config)
    assert lr_multipliers_for(config, TrainConfig()) is None
    optimizer = build_optimizer(model, LR, 0.0, None)
    assert {g["lr"] for g in optimizer.param_groups} == {LR}


def test_a_run_with_loraplus_learns_and_differs_from_plain_lora(tmp_path):
    config = causal_config(tmp_path / "cfg", tiny_llama_dir(tmp_path), rows=16, max_steps=8,
                           lr=2e-3, warmup_ratio=0.0, schedule="constant")
    plus = train_from_config(str(config), [f"output_dir={tmp_path / 'plus'}", "train.loraplus_lr_ratio=16"])
    plain = train_from_config(str(config), [f"output_dir={tmp_path / 'plain'}"])
    losses = [json.loads(line)["loss"] for line in (tmp_path / "plus" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert plus["steps"] == 8 and sum(losses[-3:]) < sum(losses[:3]), losses
    # the same A lr, B 16x faster: further in the same steps (held-out loss, same seed and data)
    assert plus["final_eval"]["loss"] < plain["final_eval"]["loss"] - 0.05
    a, b = load_file(tmp_path / "plus" / "adapter_model.safetensors"), load_file(
        tmp_path / "plain" / "adapter_model.safetensors")
    moved = {k: (a[k].float().norm() / b[k].float().norm()).item() for k in a if "lora_B" in k}
    assert min(moved.values()) > 2, moved  # B moved much further at 16x its lr
    saved = load_run_config_saved(tmp_path / "plus")
    assert saved["train"]["loraplus_lr_ratio"] == 16


def load_run_config_saved(run_dir):
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


@pytest.mark.parametrize("override,message", [
    ("train.loraplus_lr_ratio=-2", "train.loraplus_lr_ratio: must be > 0, got -2"),
    ("train.loraplus_lr_ratio=0", "train.loraplus_lr_ratio: must be > 0, got 0"),
])
def test_bad_ratio_is_one_line_exit_2(tmp_path, capsys, override, message):
    config = causal_config(tmp_path, tiny_llama_dir(tmp_path))
    capsys.readouterr()  # saving the tiny model prints a progress bar
    assert main(["train", str(config), override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


@pytest.mark.parametrize("method", ["prompt", "ia3"])
def test_methods_without_b_matrices_refuse_it_in_one_line(tmp_path, capsys, method):
    config = causal_config(tmp_path, tiny_llama_dir(tmp_path))
    capsys.readouterr()  # saving the tiny model prints a progress bar
    assert main(["train", str(config), f"method.name={method}", "train.loraplus_lr_ratio=16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"train.loraplus_lr_ratio: applies to lora, dora only, not to method '{method}'" in err
