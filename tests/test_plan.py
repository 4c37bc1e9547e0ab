"""`plan` internals: the heaviest batch is the trainer's own, and activations are measured, not
guessed (saved-for-backward bytes grow with tokens, exclude weights, differ by method)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
from conftest import tiny_llama, token_batch

import deltatune as dt
from deltatune.data.dataset import Collator, Example
from deltatune.training.optimization import BatchStream
from deltatune.compare.plan import heaviest_batch, saved_for_backward_bytes

LENGTHS = [3, 17, 5, 9, 30, 2, 11, 8, 25, 4, 6, 14, 1, 19, 7, 12, 10]


def examples() -> list[Example]:
    return [Example(input_ids=list(range(3, 3 + n)), labels=list(range(3, 3 + n))) for n in LENGTHS]


def train_settings(**values) -> SimpleNamespace:
    settings = dict(batch_size=4, seed=3, group_by_length=True, max_steps=None, epochs=2,
                    grad_accum=1)
    return SimpleNamespace(**{**settings, **values})


def brute_force(train, packing: bool) -> int:
    """The most tokens any step of the run computes, by walking the trainer's batch stream."""
    grouped = train.group_by_length and not packing
    stream = BatchStream(len(LENGTHS), train.batch_size, train.seed, 1, LENGTHS if grouped else None)
    costs = []
    for k in range(stream.per_epoch * train.epochs):
        sizes = [LENGTHS[i] for i in stream.rows(k)]
        costs.append(sum(sizes) if packing else len(sizes) * max(sizes))
    return max(costs)


def test_heaviest_padded_batch_is_rows_times_the_longest_row():
    train = train_settings()
    batch = heaviest_batch(examples(), train, Collator(0))
    assert batch["input_ids"].numel() == brute_force(train, packing=False)
    assert batch["input_ids"].shape[1] == max(LENGTHS)  # grouping puts the longest rows together


def test_heaviest_padding_free_batch_is_the_largest_sum_of_lengths():
    train = train_settings(group_by_length=False, seed=5)
    batch = heaviest_batch(examples(), train, Collator(0, packing=True, max_length=10**9))
    assert batch["input_ids"].shape[0] == 1  # one row, no padding
    assert batch["input_ids"].numel() == brute_force(train, packing=True)
    assert batch["input_ids"].numel() < 4 * max(LENGTHS)


def lm_batch(rows: int, seq: int) -> dict:
    ids = token_batch(rows, seq)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_saved_bytes_scale_with_tokens_and_exclude_the_weights():
    model = dt.apply(tiny_llama(), dt.FullConfig())
    one = saved_for_backward_bytes(model, "causal-lm", lm_batch(2, 16), packed=False, bf16=False)
    two = saved_for_backward_bytes(model, "causal-lm", lm_batch(4, 16), packed=False, bf16=False)
    assert 1.8 < two / one < 2.2
    # full fine-tuning saves each linear layer's input, never the (trainable) weights themselves
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    tiny = saved_for_backward_bytes(model, "causal-lm", lm_batch(1, 1), packed=False, bf16=False)
    assert tiny < weights / 4


def test_frozen_linear_layers_save_less_than_trained_ones():
    """A frozen linear layer keeps nothing for backward; LoRA or full training keeps its input."""
    base = tiny_llama()
    batch = lm_batch(2, 32)
    saved = {}
    for name, config in {"full": dt.FullConfig(), "lora": dt.LoraConfig(r=4),
                         "prefix": dt.PrefixConfig(num_virtual_tokens=4)}.items():
        model = dt.apply(copy.deepcopy(base), config)
        saved[name] = saved_for_backward_bytes(model, "causal-lm", batch, packed=False, bf16=False)
    assert saved["prefix"] < saved["lora"] <= saved["full"] * 1.1


def test_a_child_reports_its_own_peak_not_its_large_parents(tmp_path):
    """ru_maxrss survives fork + exec on Linux; compare's children must not inherit its peak."""
    import subprocess
    import sys

    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("VmHWM is Linux's")
    ballast = bytearray(600 * 1024 * 1024)  # the parent holds 600 MB ...
    ballast[::4096] = b"x" * len(ballast[::4096])
    code = "from deltatune.training.run_dir import peak_memory; print(peak_memory()[0])"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True).stdout.strip())
    del ballast
    assert child < 500 * 1024 * 1024  # ... the child (python + torch) holds far less


def test_measuring_keeps_no_activation_alive():
    """The measuring forward is never followed by backward; its graph must still be freed."""
    import gc

    model = dt.apply(tiny_llama(), dt.LoraConfig(r=4))
    assert saved_for_backward_bytes(model, "causal-lm", lm_batch(2, 16), packed=False, bf16=False) > 0
    gc.collect()
    in_graph = [o for o in gc.get_objects()
                if isinstance(o, torch.Tensor) and getattr(o, "grad_fn", None) is not None]
    assert in_graph == []


def tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                         max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def test_fsdp_gathers_a_tied_head_once():
    """The root group that fully_shard gathers holds the tied embedding/head tensor once."""
    from deltatune.compare.world_plan import root_and_layer_bytes

    model = tied_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    root, layer = root_and_layer_bytes(model)
    assert root == 4 * (300 * 64 + 64)  # embedding (= head) + final norm
    assert layer == 4 * sum(p.numel() for p in model.model.layers[0].parameters())


def test_per_rank_plan_shards_what_fsdp_shards():
    """fsdp at N ranks: the loaded base, the delta and the AdamW moments count 1/N; no gradient
    shards at the forward-pass peak, but the whole gradients while accumulating (FSDP keeps
    them unsharded until the last micro-batch); activations at most SHARDED_RETENTION times (the
    fsdp allocator setting returns freed blocks); ddp keeps everything whole plus its buckets."""
    from deltatune.compare.plan import MethodPlan
    from deltatune.compare.world_plan import (DIST_RUNTIME_BYTES, SHARDED_RETENTION, per_process,
                                              root_and_layer_bytes)

    model = tied_llama()
    base = sum(p.numel() * 4 for p in model.parameters())
    one = MethodPlan(method="full", trainable_params=base // 4, total_params=base // 4,
                     trainable_share=1.0, weights_bytes=base, gradient_bytes=base,
                     optimizer_bytes=2 * base, activation_bytes=4000, baseline_bytes=base + 10_000,
                     predicted_peak_bytes=0, predicted_file_bytes=base)
    root, layer = root_and_layer_bytes(model)
    for n in (2, 4):
        fsdp = per_process(one, model, base, n, "fsdp", False, 1.5, 800)
        assert fsdp.baseline_bytes == 10_000 + base // n
        assert (fsdp.optimizer_bytes, fsdp.gradient_bytes) == (2 * base // n, base // n)
        assert fsdp.predicted_peak_bytes == int(10_000 + base // n + 2 * base // n + root + 2 * layer
                                                + SHARDED_RETENTION * (4000 // n) + 800 // n
                                                + DIST_RUNTIME_BYTES)
        accumulating = per_process(one, model, base, n, "fsdp", False, 1.5, 800, grad_accum=2)
        assert accumulating.predicted_peak_bytes - fsdp.predicted_peak_bytes == base
        bf16 = per_process(one, model, base, n, "fsdp", True, 1.5, 800)
        assert fsdp.predicted_peak_bytes - bf16.predicted_peak_bytes == (root + 2 * layer) // 2
    ddp = per_process(one, model, base, 2, "ddp", False, 1.5, 800)
    assert ddp.predicted_peak_bytes == int(base + 10_000 + 4 * base + 1.5 * 2000 + 800 + DIST_RUNTIME_BYTES)
    assert per_process(one, model, base, 1, "fsdp", False, 1.5, 800) is one
