"""Speed levers of a training step that leave its arithmetic unchanged, each measured on its own
(benchmarks/training/levers.py) and kept only where it paid.

Frozen weights in bf16 (`train.frozen_bf16`, on with bf16 autocast): autocast casts a frozen
fp32 weight to bf16 on every forward call (it caches only the casts of weights that train), so
the layer reads 4 bytes per weight and writes 2 more each time, and the process holds the fp32
copy. Stored in bf16 to begin with, the same bf16 values go into the same products (a cast is
round-to-nearest either way: the loss and every gradient are bit-identical), half the memory
stays resident and no cast runs. Only weights that do not train and sit in linear maps are
touched; embeddings (a tied LM head, the residual stream's first values) stay as they are.
Because the original fp32 values are gone, `train` only does this to a model it owns
(train_from_config loads it and drops it after saving the delta).
"""
from __future__ import annotations

import torch
from torch import nn


def frozen_linear_weights(model: nn.Module) -> list[nn.Parameter]:
    """The fp32 weights of linear maps that do not train (the output embedding excluded: it is
    the input embedding when tied)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found, seen = [], set()
    for module in model.modules():
        if not isinstance(module, nn.Linear) or module is output:
            continue
        weight = module.weight
        if (weight.requires_grad or weight.dtype != torch.float32 or id(weight) in seen
                or (output is not None and weight is getattr(output, "weight", None))):
            continue
        seen.add(id(weight))
        found.append(weight)
    return found


def hold_frozen_weights_in_bf16(model: nn.Module) -> int:
    """Store the frozen linear weights as bf16 (for a model that computes under bf16 autocast);
    returns the bytes freed."""
    freed = 0
    with torch.no_grad():
        for weight in frozen_linear_weights(model):
            freed += weight.numel() * 2
            weight.data = weight.data.to(torch.bfloat16)
    return freed
