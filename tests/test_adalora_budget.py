"""AdaLoRA's rank budget during training: the same triplets pruned at the same steps as PEFT's
RankAllocator (same weights, data and optimizer), the total rank on PEFT's cubic schedule, and a
run of the trainer saving a file that reloads at the pruned ranks, here and in PEFT."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import tiny_llama, token_batch
from safetensors.torch import load_file
from tiny_runs import alpaca_rows, one_thread, tiny_llama_dir, write_config, write_jsonl  # noqa: F401

import deltatune as dt
from deltatune.deltas import after_optimizer_step, training_loss_term
from deltatune.methods.adalora import adalora_deltas
from deltatune.methods.adalora_budget import budget_at

import peft  # noqa: E402  (a test-only oracle)

TARGETS = ["q_proj", "v_proj", "down_proj"]
SCHEDULE = dict(init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=14)


def peft_model():
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(
            target_modules=TARGETS, lora_alpha=8, task_type="CAUSAL_LM", **SCHEDULE))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # E away from 0 so that A and B get gradients from the first step
        for name, param in model.named_parameters():
            if "lora_E" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def kept_counts(model) -> list[int]:
    return [int(delta.kept.sum()) for _, delta in adalora_deltas(model, "default")]


def test_the_same_triplets_are_pruned_at_the_same_steps_as_peft(tmp_path):
    theirs = peft_model()
    theirs.save_pretrained(tmp_path / "start")
    ours = dt.load_adapter(tiny_llama(), tmp_path / "start")
    assert ours.deltatune_state.configs["default"].total_step == SCHEDULE["total_step"]
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
                  for m in (theirs, ours)]
    layers = len(adalora_deltas(ours, "default"))
    initial, target = 6 * layers, 2 * layers
    for step in range(1, SCHEDULE["total_step"] + 3):
        ids = token_batch(4, 9, seed=step)
        theirs.train()
        ours.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs(input_ids=ids, labels=ids).loss.backward()  # PEFT adds the penalty itself
        (ours(input_ids=ids, labels=ids).loss + training_loss_term(ours)).backward()
        for optimizer in optimizers:
            optimizer.step()
        theirs.base_model.update_and_allocate(step)
        after_optimizer_step(ours, step, total_steps=99)  # the config's total_step wins
        for optimizer in optimizers:
            optimizer.zero_grad()
        pattern = theirs.peft_config["default"].rank_pattern
        if pattern:
            mine = {f"{path}.lora_E.default": delta.pattern() for path, delta in adalora_deltas(ours, "default")}
            assert mine == pattern, f"step {step}"
        budget, _ = budget_at(step, initial, target, SCHEDULE["tinit"], SCHEDULE["tfinal"],
                              SCHEDULE["total_step"], SCHEDULE["deltaT"])
        if step <= SCHEDULE["tinit"]:
            assert sum(kept_counts(ours)) == initial  # the warm-up prunes nothing
        elif step % SCHEDULE["deltaT"] == 0 or step >= SCHEDULE["total_step"] - SCHEDULE["tfinal"]:
            assert sum(kept_counts(ours)) == budget, f"step {step}"
    assert sum(kept_counts(ours)) == target
    ids = token_batch(3, 7, seed=99)
    ours.eval()
    theirs.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max().item() < 1e-4


def test_the_budget_follows_peft_s_cubic_schedule():
    config = peft.AdaLoraConfig(target_modules=TARGETS, **SCHEDULE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        allocator = peft.get_peft_model(tiny_llama(), config).base_model.rankallocator
    for step in range(1, SCHEDULE["total_step"] + 3):
        ours = budget_at(step, allocator.init_bgt, allocator.target_bgt, SCHEDULE["tinit"],
                         SCHEDULE["tfinal"], SCHEDULE["total_step"], SCHEDULE["deltaT"])
        theirs = allocator.budget_schedule(step)
        assert ours == theirs, step
    budgets = [budget_at(s, 36, 12, 2, 3, 14, 1)[0] for s in range(1, 15)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] == 36 and budgets[-1] == 12


def test_a_trained_run_saves_the_pruned_ranks_and_reloads_them(tmp_path, one_thread):  # noqa: F811
    from deltatune.training.loop import train_from_config

    model_dir = tiny_llama_dir(tmp_path)
    write_jsonl(tmp_path / "data" / "alpaca.jsonl", alpaca_rows(32, seed=1))
    config = write_config(tmp_path / "run.yaml", {
        "model": str(model_dir), "task": "causal-lm",
        "data": {"train": "data/alpaca.jsonl", "eval": "data/alpaca.jsonl", "format": "alpaca",
                 "max_length": 128, "max_eval_rows": 8},
        "method": {"name": "adalora", "init_r": 4, "target_r": 1, "target_modules": ["q_proj", "v_proj"],
                   "tinit": 1, "tfinal": 1},
        "train": {"batch_size": 4, "lr": 1e-2, "log_every": 1, "bf16": False, "max_steps": 6},
        "output_dir": str(tmp_path / "out"),
    })
    summary = train_from_config(str(config))
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == summary["steps"] == 6
    pattern = saved["rank_pattern"]
    assert len(pattern) == 4 and all(len(v) == 4 for v in pattern.values())
    assert sum(sum(v) for v in pattern.values()) == 4  # target_r 1 x 4 layers
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    for key, keep in pattern.items():
        assert tensors[f"base_model.model.{key}"].shape == (sum(keep), 1)
    from transformers import AutoModelForCausalLM

    ids = token_batch(2, 7)
    ours = dt.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "out").eval()
    assert sorted(kept_counts(ours)) == sorted(sum(v) for v in pattern.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                                tmp_path / "out").eval()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
        assert (ours(input_ids=ids).logits - expected).abs().max().item() < 1e-5
        with dt.disable_adapters(ours):
            assert (ours(input_ids=ids).logits - expected).abs().max().item() > 1e-6
    dt.save_adapter(ours, tmp_path / "again")  # saved again: the same pattern, the same tensors
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again["rank_pattern"] == pattern
    assert {k: v.shape for k, v in load_file(tmp_path / "again" / "adapter_model.safetensors").items()} \
        == {k: v.shape for k, v in tensors.items()}


def test_a_schedule_that_does_not_fit_the_run_is_refused_in_one_line():
    model = dt.apply(tiny_llama(), dt.AdaLoraConfig(tinit=4, tfinal=4))
    ids = token_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(dt.DeltatuneError, match=r"AdaLoraConfig.tinit: .* in 6 steps \(the run's"):
        after_optimizer_step(model, 1, total_steps=6)


def test_the_penalty_is_zero_for_orthonormal_factors_and_off_at_weight_zero():
    model = dt.apply(tiny_llama(), dt.AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        for _, delta in adalora_deltas(model, "default"):
            delta.lora_A.copy_(torch.eye(4, 64))
            delta.lora_B.copy_(torch.eye(64, 4))
    assert training_loss_term(model).item() == pytest.approx(0.0, abs=1e-6)
    off = dt.apply(tiny_llama(), dt.AdaLoraConfig(orth_reg_weight=0.0))
    assert training_loss_term(off) is None
    assert training_loss_term(dt.apply(tiny_llama(), dt.LoraConfig())) is None  # other methods: none


def test_a_checkpoint_saved_after_pruning_restores_into_the_full_rank_run(tmp_path):
    """save_every writes the adapter (pruned, as PEFT saves it); resuming loads it back into the
    run's full-rank layers at the same slots, with the same logits and the same pattern."""
    from deltatune.training.checkpoints import restore_delta

    model = dt.apply(tiny_llama(), dt.AdaLoraConfig(init_r=4, target_r=1, total_step=4,
                                                    target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    ids = token_batch()
    for step in range(1, 3):  # mid-schedule: pruned, not yet at the target
        model(input_ids=ids, labels=ids).loss.backward()
        after_optimizer_step(model, step, 4)
        model.zero_grad()
    assert 4 < sum(kept_counts(model)) < 16
    expected = model(input_ids=ids).logits.detach()
    dt.save_adapter(model, tmp_path / "adapter")
    resumed = dt.apply(tiny_llama(), dt.AdaLoraConfig(init_r=4, target_r=1, total_step=4,
                                                      target_modules=["q_proj", "v_proj"]))
    restore_delta(resumed, tmp_path / "adapter")
    assert kept_counts(resumed) == kept_counts(model)
    assert [d.pattern() for _, d in adalora_deltas(resumed, "default")] == \
        [d.pattern() for _, d in adalora_deltas(model, "default")]
    assert (resumed(input_ids=ids).logits - expected).abs().max().item() < 1e-6
