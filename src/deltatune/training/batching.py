"""How the trainer batches rows: the collator for an (adapted) model and the run's batch order.
Shared by the training loop and `deltatune plan`, which replays the same stream."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from deltatune.training.optimization import BatchStream
from deltatune.training.packed_attention import ONE_ROW, supports_packed_attention


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def training_collator(model: nn.Module, pad_token_id: int | None, task: str, data: Any,
                      tc: Any) -> Collator:
    """How the trainer batches rows for this (adapted) model. Padding-free (causal LM): a
    batch's examples are laid end to end in one row and each attends only to itself
    (packed_attention), so no layer computes a padding token."""
    from deltatune.data.dataset import Collator

    padding_free = (task == "causal-lm" and getattr(tc, "padding_free", True)
                    and not data.packing and supports_packed_attention(model))
    return Collator(pad_token_id, packing=data.packing or padding_free,
                    max_length=ONE_ROW if padding_free else data.max_length)


def training_stream(dataset: Any, tc: Any, collator: Collator,
                    world_size: int = 1) -> tuple[BatchStream, int]:
    """The run's batch order (rows grouped by length unless packed) and its number of steps."""
    grouped = getattr(tc, "group_by_length", True) and not collator.packing
    stream = BatchStream(len(dataset), tc.batch_size, tc.seed, world_size,
                         [len(e.input_ids) for e in dataset] if grouped else None)
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * stream.per_epoch / tc.grad_accum))
    return stream, total_steps
