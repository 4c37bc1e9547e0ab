"""Layers whose change to a row depends on that row alone (VeRA, AdaLoRA, BitFit, LayerNorm
tuning): mixed-adapter batches, where each row's output goes through its own adapter's delta, and
the linear layer VeRA and AdaLoRA share (base output + a delta's output, mergeable as a dense
update of the weight)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from deltatune.methods.base import DeltaLayer
from deltatune.methods.lora import _is_conv1d
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


class AdditiveLinearLayer(DeltaLayer):
    """A linear layer (nn.Linear or GPT-2's Conv1D) plus named deltas whose output is added to
    the base layer's; a delta exposes `delta_weight()` ((out, in)) for merging. Subclasses name
    the delta parameter whose dtype the input is cast to outside autocast (PARAMETER)."""

    PARAMETER = ""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.merged: str | None = None
        self.transposed = _is_conv1d(base_layer)  # Conv1D stores (in, out)
        self.row_adapters: tuple[str | None, ...] | None = None  # see deltatune.mixed

    def _input(self, delta: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            return x
        return x.to(getattr(delta, self.PARAMETER).dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            return mixed_rows(self, x, out, lambda delta, rows_x, rows_out: rows_out + delta(
                self._input(delta, rows_x)))
        delta = self.active_delta()
        if delta is None or self.merged == self.active:
            return out
        return out + delta(self._input(delta, x)).to(out.dtype)

    def _delta_weight(self, name: str) -> torch.Tensor:
        delta = self.deltas[name].delta_weight()
        return delta.T if self.transposed else delta

    def merge(self) -> None:
        if self.active is None or self.merged is not None:
            return
        with torch.no_grad():
            weight = self.base_layer.weight
            weight.data += self._delta_weight(self.active).to(weight.dtype)
        self.merged = self.active

    def unmerge(self) -> None:
        if self.merged is None:
            return
        with torch.no_grad():
            weight = self.base_layer.weight
            weight.data -= self._delta_weight(self.merged).to(weight.dtype)
        self.merged = None
