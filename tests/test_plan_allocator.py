"""plan's allocator term: the heap ratchets only on batches larger than every earlier one, so the
retention a run pays depends on its replayed batch sequence (README "plan vs measured")."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import tiny_llama

import deltatune as dt
from deltatune.compare.plan import (RETENTION, RUNTIME_ALLOWANCE_BYTES, REUSABLE_SHARE,
                                    allocator_fill, heaviest_batch, logit_bytes, plan_method,
                                    step_costs)
from deltatune.config.run import DataConfig
from deltatune.data.dataset import Example
from deltatune.training.batching import training_collator


def test_fill_walks_the_heap_ratchet_over_the_batch_sequence():
    rho = REUSABLE_SHARE
    assert allocator_fill([8]) == 0.0            # one batch: the heap holds its demand, no more
    assert allocator_fill([8, 1, 2, 3]) == 0.0   # later batches fit in the holes it left
    # by hand: each batch reuses rho of the heap and takes the rest of its demand fresh
    heap = 0.0
    for demand in (2 / 8, 4 / 8, 1 / 8, 1.0, 1.0):
        heap = max(heap, (1 - rho) * heap + demand)
    assert allocator_fill([2, 4, 1, 8, 8]) == pytest.approx((heap - 1) / (1 / rho - 1))
    # growing batches fill more than the same batches with the heaviest first
    assert allocator_fill([2, 4, 8]) > allocator_fill([8, 4, 2])
    # many batches near the heaviest: the heap tends to 1 / rho times its demand
    assert 0.99 < allocator_fill([1000 - k % 7 for k in range(60)]) <= 1.0
    assert allocator_fill([]) == 0.0


def rows_of(lengths: list[int]) -> list[Example]:
    return [Example(input_ids=list(range(3, 3 + n)), labels=list(range(3, 3 + n))) for n in lengths]


@pytest.mark.parametrize("lengths", [[12] * 16, [2, 5, 9, 12, 3, 7, 11, 4, 6, 10, 8, 1, 12, 2, 5, 9]])
def test_peak_counts_the_saved_activations_as_far_as_the_run_ratchets(lengths):
    """peak = baseline + delta + gradients + AdamW + (1 + (R - 1) * fill) * saved + logits +
    allowance: the saved activations count between once and RETENTION times, as far as the
    replayed batch sequence ratchets the heap; the logits chunk (mapped on its own) once."""
    model = tiny_llama()
    train = SimpleNamespace(batch_size=2, seed=1, group_by_length=False, max_steps=None, epochs=1,
                            grad_accum=1, bf16=False, gradient_checkpointing=False, padding_free=True)
    run = SimpleNamespace(task="causal-lm", data=DataConfig(train="x.jsonl", max_length=64))
    dataset = rows_of(lengths)
    baseline = 10**9
    plan = plan_method(model, {"name": "lora", "r": 4}, dataset, 0, run, train, baseline)

    collator = training_collator(dt.apply(tiny_llama(), dt.LoraConfig(r=4)), 0, "causal-lm", run.data, train)
    fill = allocator_fill(step_costs(dataset, train, collator)[1])
    assert 0.0 < fill <= 1.0
    logits = logit_bytes(model, "causal-lm", heaviest_batch(dataset, train, collator))
    saved = plan.activation_bytes - logits
    assert logits > 0 and saved > 0
    own = baseline + 4 * (plan.total_params - sum(p.numel() for p in model.parameters())) \
        + plan.gradient_bytes + plan.optimizer_bytes + RUNTIME_ALLOWANCE_BYTES
    expected = own + (1 + (RETENTION["lora"] - 1) * fill) * saved + logits
    assert plan.predicted_peak_bytes == int(expected)
    assert plan.allocator_fill == fill
