"""Speed levers of a LoRA step, each against the code it replaces: the
per-example attention as one autograd node (bit-identical), LoRA's input cast once under autocast
(same forward, gradients within bf16 rounding, fewer casts), and the compiled norms and SwiGLU
(`train.compile`: within rounding, one graph for every token count)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import VOCAB, randomize_trainable, tiny_llama
from deltatune import LoraConfig, apply
from deltatune.methods import lora
from deltatune.training import packed_attention as pa
from deltatune.training.compiled import compiled_elementwise
from deltatune.training.losses import batch_loss
from tiny_runs import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _lora_llama():
    model = apply(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules="all-linear")).train()
    randomize_trainable(model)  # B = 0 would hide errors in A's gradient
    return model


def _packed(lengths, rows=1, seed=0):
    """`rows` packed rows of examples of these lengths (position ids restart per example)."""
    generator = torch.Generator().manual_seed(seed)
    positions = torch.cat([torch.arange(n) for n in lengths]).expand(rows, -1)
    ids = torch.randint(3, VOCAB, positions.shape, generator=generator)
    return {"input_ids": ids, "position_ids": positions.contiguous(), "labels": ids.clone()}


def _loss_and_grads(model, batch, bf16, attention=True):
    model.zero_grad(set_to_none=True)
    with pa.packed_attention(model) if attention else pa.contextlib.nullcontext():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = batch_loss(model, "causal-lm", batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("rows", [1, 2])
def test_per_example_attention_node_is_bit_identical_to_the_sliced_sdpa_loop(monkeypatch, bf16, rows):
    model = _lora_llama()
    batch = _packed([7, 3, 12, 30], rows=rows)
    monkeypatch.setattr(pa, "EXPLICIT_BACKWARD_TOKENS", 0)  # flash's backward for every example
    loss, grads = _loss_and_grads(model, batch, bf16)
    monkeypatch.setattr(pa, "_CPU_FLASH_DTYPES", ())  # the loop of SDPA calls on slices
    ref_loss, ref_grads = _loss_and_grads(model, batch, bf16)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name


@pytest.mark.parametrize("length", [1, 5, 40, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_explicit_backward_is_as_accurate_as_flash(length, dtype):
    """Short examples' backward recomputes the probabilities: against a float64 reference its
    gradients are no further off than the flash kernel's (GQA: 6 query heads on 2 kv heads)."""
    generator = torch.Generator().manual_seed(length)
    q, k, v, grad = (torch.randn(1, h, length, 16, generator=generator).to(dtype) for h in (6, 2, 2, 6))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=0.25)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, q, k, v, out, lse, 0.0, True, scale=0.25)
    ours = pa._explicit_backward(grad, q, k, v, out, lse, 0.25)
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    torch.nn.functional.scaled_dot_product_attention(
        *exact, is_causal=True, scale=0.25, enable_gqa=True).backward(grad.double())
    for name, a, b, ref in zip("qkv", ours, flash, exact):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        ours_err, flash_err = ((x.double() - ref.grad).abs().max() for x in (a, b))
        # fp32: a few ulps of the gradient's size on top, since both kernels' summation order
        # depends on the CPU (AMX machine: dV 1.1x flash's error at 130 tokens; AVX512-bf16
        # without AMX: 2.8x, 2.7e-6 on gradients up to 5.4, i.e. 4 ulps)
        slack = 8 * torch.finfo(torch.float32).eps * ref.grad.abs().max() if dtype == torch.float32 else 1e-3
        assert ours_err <= 1.5 * flash_err + slack, (name, ours_err, flash_err)


def test_short_examples_backward_stays_within_rounding_of_flash(monkeypatch):
    model = _lora_llama()
    batch = _packed([7, 3, 12, 30, 90])
    loss, grads = _loss_and_grads(model, batch, bf16=True)
    monkeypatch.setattr(pa, "EXPLICIT_BACKWARD_TOKENS", 0)
    ref_loss, ref_grads = _loss_and_grads(model, batch, bf16=True)
    assert torch.equal(loss, ref_loss)  # the forward is flash's either way
    for name in grads:
        scale = ref_grads[name].abs().max()
        assert (grads[name] - ref_grads[name]).abs().max() <= 2e-2 * scale, name


def test_per_example_attention_matches_each_example_alone():
    model = _lora_llama()
    lengths = [5, 9, 3]
    batch = _packed(lengths)
    with pa.packed_attention(model):
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    alone = torch.cat([model(input_ids=ids).logits
                       for ids in batch["input_ids"].split(lengths, dim=1)], 1)
    assert torch.allclose(packed, alone, atol=1e-5)


class _CountCasts(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def test_lora_input_cast_once_same_forward_fewer_casts_gradients_within_bf16(monkeypatch):
    model = _lora_llama()
    batch = _packed([11, 6, 20])
    runs = {}
    for once in (False, True):
        monkeypatch.setattr(lora, "CAST_INPUT_ONCE", once)
        with _CountCasts() as counter:
            runs[once] = (*_loss_and_grads(model, batch, bf16=True), counter.casts)
    (loss, grads, casts), (ref_loss, ref_grads, ref_casts) = runs[True], runs[False]
    assert torch.equal(loss, ref_loss)  # every product sees the same bf16 values
    # One cast per wrapped linear fewer forward, and one fewer gradient cast back.
    layers = len(lora.lora_layers(model))
    assert casts <= ref_casts - 2 * layers, (casts, ref_casts)
    for name in grads:
        scale = ref_grads[name].abs().max()
        assert (grads[name] - ref_grads[name]).abs().max() <= 2e-2 * scale, name


def test_lora_input_cast_leaves_fp32_alone():
    model = _lora_llama()
    batch = _packed([8, 5])
    loss, grads = _loss_and_grads(model, batch, bf16=False)
    lora.CAST_INPUT_ONCE = False
    try:
        ref_loss, ref_grads = _loss_and_grads(model, batch, bf16=False)
    finally:
        lora.CAST_INPUT_ONCE = True
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)


@pytest.mark.parametrize("bf16", [False, True])
def test_compiled_norms_and_mlps_match_eager_without_recompiling(bf16):
    import torch._dynamo

    model = _lora_llama()
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    graphs = []
    for lengths in ([7, 3, 12], [20, 9, 5, 4], [31, 2]):  # three token counts
        batch = _packed(lengths)
        ref_loss, ref_grads = _loss_and_grads(model, batch, bf16)
        with compiled_elementwise(model) as routed:
            loss, grads = _loss_and_grads(model, batch, bf16)
        assert routed == 2 * 2 + 1 + 2 + 1  # 2 norms and an MLP a layer, the final norm, rotary
        graphs.append(counters["stats"]["unique_graphs"])
        tolerance = 2e-2 if bf16 else 1e-5
        assert torch.allclose(loss, ref_loss, atol=tolerance)
        for name in ref_grads:
            scale = ref_grads[name].abs().max()
            assert (grads[name] - ref_grads[name]).abs().max() <= tolerance * scale, name
    assert graphs[0] > 0 and graphs[1] == graphs[0] and graphs[2] == graphs[0], graphs
    # Outside the block the model is eager again.
    assert "forward" not in vars(model.model.norm)


@pytest.mark.parametrize("alpha, exact", [(8, True), (3, False)])  # r=4: scale 2, then 0.75
def test_lora_scale_at_rank_same_numbers_for_power_of_two_scales(monkeypatch, alpha, exact):
    model = apply(tiny_llama(), LoraConfig(r=4, alpha=alpha, target_modules="all-linear")).train()
    randomize_trainable(model)
    batch = _packed([9, 14])
    runs = {}
    for at_rank in (False, True):
        monkeypatch.setattr(lora, "SCALE_AT_RANK", at_rank)
        runs[at_rank] = _loss_and_grads(model, batch, bf16=True)
    (loss, grads), (ref_loss, ref_grads) = runs[True], runs[False]
    if exact:
        assert torch.equal(loss, ref_loss)
        assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    else:
        assert torch.allclose(loss, ref_loss, rtol=1e-2)
        for name in grads:
            scale = ref_grads[name].abs().max()
            assert (grads[name] - ref_grads[name]).abs().max() <= 2e-2 * scale, name


def test_compiled_rotary_is_restored_and_left_alone_outside():
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb
    model = _lora_llama()
    with compiled_elementwise(model), compiled_elementwise(model):  # nested: one restore
        assert modeling_llama.apply_rotary_pos_emb is not original
    assert modeling_llama.apply_rotary_pos_emb is original


def test_train_compile_key_trains_like_eager(tmp_path, monkeypatch):
    """`train.compile: true` routes the run's steps through the compiled functions (and only
    them: the model is eager again afterwards) and trains as eager does, within rounding."""
    import json

    from deltatune.training import loop
    from tiny_runs import causal_config, tiny_llama_dir

    calls = []

    def counting(model):
        calls.append(model)
        return compiled_elementwise(model)

    monkeypatch.setattr(loop, "compiled_elementwise", counting)
    config = causal_config(tmp_path / "cfg", tiny_llama_dir(tmp_path), rows=12, max_steps=3)
    losses = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        loop.train_from_config(str(config), [f"output_dir={out}", f"train.compile={flag}",
                                        "train.group_by_length=false"])
        losses[flag] = [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    assert len(calls) == 3  # one per micro-batch of the compiled run, none in the eager one
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
