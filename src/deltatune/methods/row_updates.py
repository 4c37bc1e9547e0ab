"""Mixed-adapter batches for layers whose change to a row depends on that row alone (VeRA,
AdaLoRA, BitFit, LayerNorm tuning): each row's output goes through its own adapter's delta."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from deltatune.methods.lora_rows import row_groups


def mixed_rows(layer: nn.Module, x: torch.Tensor, out: torch.Tensor,
               adapted: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`out` (the base layer's output for `x`) with the rows of each adapter in
    `layer.row_adapters` replaced by `adapted(delta, rows of x, rows of out)`; rows of the base
    (None) or of an adapter this layer does not carry keep the base output."""
    result = out
    for name, rows in row_groups(layer.row_adapters, x.shape[0], x.device):
        if name in layer.deltas:
            if result is out:
                result = out.clone()
            rows_out = adapted(layer.deltas[name], x.index_select(0, rows), out.index_select(0, rows))
            result.index_copy_(0, rows, rows_out.to(out.dtype))
    return result
