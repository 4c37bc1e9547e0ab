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
    assert plan.allocator_fill == fill and plan.logit_bytes == logits


def test_an_int8_base_counts_the_inputs_bitsandbytes_keeps_outside_the_graph(tmp_path):
    """On CPU bitsandbytes trains 8-bit layers through MatMul8bitFp, which keeps each input as
    `ctx.A` rather than through save_for_backward: plan must count it (once per storage)."""
    import torch
    from tiny_runs import tiny_llama_dir

    from deltatune.compare.plan import saved_for_backward_bytes
    from deltatune.training.losses import batch_loss

    pytest.importorskip("bitsandbytes")
    model, _ = dt.load_model(str(tiny_llama_dir(tmp_path)), quantize="int8")
    model = dt.apply(model, dt.LoraConfig(r=4))
    ids = torch.randint(3, 250, (2, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    counted = saved_for_backward_bytes(model, "causal-lm", batch, packed=False, bf16=True)

    # the same forward, by hand: what autograd saves, plus every ctx.A on the graph
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        loss = batch_loss(model, "causal-lm", batch)
    hooked = sum(n for ptr, n in storages.items() if ptr not in parameters)
    seen, stack, inputs = set(), [loss.grad_fn], {}
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        kept = getattr(node, "A", None)
        if isinstance(kept, torch.Tensor):
            inputs[kept.untyped_storage().data_ptr()] = kept.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    storages.update(inputs)
    expected = sum(n for ptr, n in storages.items() if ptr not in parameters)
    del loss
    assert inputs and expected > hooked  # the int8 layers do keep inputs the hooks never see
    assert counted == expected


def test_the_inputs_an_int8_layer_keeps_count_once_in_the_peak(tmp_path):
    """Every forward makes those inputs anyway; keeping them until backward adds their bytes,
    not RETENTION times their bytes (SmolLM2 int8 vs nf4, README "plan vs measured")."""
    import copy

    from tiny_runs import tiny_llama_dir

    from deltatune.compare.plan import saved_bytes_by_kind

    pytest.importorskip("bitsandbytes")
    model, _ = dt.load_model(str(tiny_llama_dir(tmp_path)), quantize="int8")
    train = SimpleNamespace(batch_size=2, seed=1, group_by_length=False, max_steps=None, epochs=1,
                            grad_accum=1, bf16=True, gradient_checkpointing=False, padding_free=True)
    run = SimpleNamespace(task="causal-lm", data=DataConfig(train="x.jsonl", max_length=64))
    dataset = rows_of([20, 5, 40, 12, 33, 8, 27, 16])
    plan = plan_method(model, {"name": "lora", "r": 4}, dataset, 0, run, train, 0)

    adapted = dt.apply(copy.deepcopy(model), dt.LoraConfig(r=4))
    collator = training_collator(adapted, 0, "causal-lm", run.data, train)
    batch = heaviest_batch(dataset, train, collator)
    saved, kept = saved_bytes_by_kind(adapted, "causal-lm", batch, collator.packing, bf16=True)
    assert kept > 0 and plan.allocator_fill > 0  # else counting them once or R times agree
    retention = 1 + (RETENTION["lora"] - 1) * plan.allocator_fill
    own = plan.predicted_peak_bytes - retention * saved - kept - plan.logit_bytes
    assert plan.activation_bytes == saved + kept + plan.logit_bytes
    assert own == pytest.approx(4 * (plan.total_params - sum(p.numel() for p in model.parameters()))
                                + plan.gradient_bytes + plan.optimizer_bytes
                                + RUNTIME_ALLOWANCE_BYTES, abs=2)
