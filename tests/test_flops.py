"""benchmarks/common/flops.py (the model-FLOPs count behind every MFU figure) against what autograd
actually multiplies, counted by torch's FlopCounterMode on a tiny Llama: forward, LoRA (frozen
weights: no weight-gradient products) and full fine-tuning, with the LM head only on the
labelled positions (deltatune's chunked loss)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import deltatune as dt
from byte_tokenizer import tiny_chat_llama
from deltatune.training.losses import batch_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "common"))
import flops  # noqa: E402

LENGTH = 24


def _counted_matmuls(model, batch, backward: bool) -> tuple[float, float]:
    """(FLOPs of the linear maps and the head, FLOPs of attention) as FlopCounterMode sees them."""
    with FlopCounterMode(display=False) as counter:
        if backward:
            batch_loss(model, "causal-lm", batch).backward()
        else:
            with torch.no_grad():
                model(input_ids=batch["input_ids"])
    counts = counter.get_flop_counts()["Global"]
    attention = sum(v for op, v in counts.items() if "attention" in str(op))
    return sum(counts.values()) - attention, attention


def _batch(labelled_from: int):
    ids = torch.randint(3, 200, (1, LENGTH))
    labels = ids.clone()
    labels[:, :labelled_from] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def test_forward_flops_match_the_counted_products():
    model, _ = tiny_chat_llama()
    shape = flops.Shape.of(model.config)
    counted, _ = _counted_matmuls(model, _batch(0), backward=False)
    expected = LENGTH * flops.projection_flops(shape, "inference") + flops.head_flops(shape, LENGTH, "inference")
    assert counted == expected  # (the CPU SDPA kernel is not counted by FlopCounterMode)
    model.set_attn_implementation("eager")  # attention as plain matmuls over the full square
    counted, _ = _counted_matmuls(model, _batch(0), backward=False)
    square = counted - expected
    # the model needs the causal half of the square (plus its diagonal)
    causal = flops.attention_flops(shape, LENGTH, "inference")
    assert square > 0 and causal == pytest.approx(square * (LENGTH + 1) / (2 * LENGTH))


@pytest.mark.parametrize("training", ["lora", "full"])
def test_training_flops_match_what_autograd_multiplies(training):
    model, _ = tiny_chat_llama()
    targets = ["q_proj", "v_proj", "down_proj"]
    config = dt.LoraConfig(r=4, alpha=8, target_modules=targets) if training == "lora" else dt.FullConfig()
    dt.apply(model, config)
    model.train()
    shape = flops.Shape.of(model.config)
    batch = _batch(labelled_from=10)
    scored = int((batch["labels"][:, 1:] != -100).sum())
    linear, _ = _counted_matmuls(model, batch, backward=True)
    expected = (LENGTH * flops.projection_flops(shape, training, 4, targets)
                + flops.head_flops(shape, scored, training))
    assert linear == expected
    # frozen weights need no weight-gradient products: LoRA costs about 2/3 of full fine-tuning
    if training == "lora":
        full = LENGTH * flops.projection_flops(shape, "full") + flops.head_flops(shape, scored, "full")
        assert linear < 0.75 * full


def test_mfu_is_flops_over_time_over_peak():
    assert flops.mfu(2e9, 2.0, 2.0) == pytest.approx(0.5)
