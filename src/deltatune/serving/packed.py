"""Linear layers whose weights stay packed in MKL's blocked layout while a server runs (CPU, float32).

PyTorch's CPU matmul re-packs the weight matrix into MKL's layout on every call. For a decoding
step (a few rows per product) that packing is a large part of the step and costs the same however
few rows there are, so many small steps (rows of adapters that wait their turn for a slot under
--max-adapters) pay it again and again. `pack_linears` keeps one packed copy per float32 nn.Linear
(one more copy of those weights in memory) and multiplies against it.

Same numbers, bit for bit: packed for a batch of PACK_ROWS, MKL's product equals F.linear's for any
number of rows (checked once per layer on a probe; a layer where it differs keeps F.linear). The
plain path is taken for anything else: gradients, autocast, another dtype or device. A weight
changed in place (a delta merged into it and taken out again, training) is packed again at its
next call, a few times (MAX_CHANGES); one that keeps changing stays on the plain path.
"""
from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F

PACK_ROWS = 32
MAX_CHANGES = 3  # packed again after this many in-place changes of a weight, then left plain
_PACKED = "_deltatune_packed"


def available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def pack_linears(model: nn.Module) -> int:
    """Serve every float32 CPU nn.Linear of `model`'s base (not its adapters' own layers) from a
    packed weight when no gradient is wanted (inference_mode, no_grad); how many layers."""
    if not available():
        return 0
    count = 0
    for name, module in model.named_modules():
        if ".deltas." in f".{name}.":  # an adapter's own small layers: they come and go
            continue
        weight = getattr(module, "weight", None)
        if type(module) is nn.Linear and weight is not None and weight.dtype == torch.float32 \
                and weight.device.type == "cpu" and "forward" not in module.__dict__:
            module.forward = types.MethodType(_forward, module)  # this instance only; a deepcopy keeps it
            count += 1
    return count


class _Held:
    """A packed weight and the weight's stamp then. MKL's packed tensor cannot be copied or
    pickled: a deepcopy or pickle of the model drops it (packed again at the next call)."""

    __slots__ = ("stamp", "packed", "changes")

    def __init__(self, stamp: tuple, packed: torch.Tensor | None, changes: int) -> None:
        self.stamp, self.packed, self.changes = stamp, packed, changes

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        return type(None), ()


def _stamp(weight: torch.Tensor) -> tuple:
    return -1 if weight.is_inference() else weight._version, weight.data_ptr()


def _pack(layer: nn.Linear) -> torch.Tensor | None:
    weight = layer.weight.detach()
    with torch.inference_mode(False), torch.no_grad():
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, PACK_ROWS)
        probe = torch.linspace(-1, 1, 3 * weight.shape[1]).reshape(3, -1)
        same = torch.equal(torch.ops.mkl._mkl_linear(probe, packed, weight, layer.bias, PACK_ROWS),
                           F.linear(probe, weight, layer.bias))
    return packed if same else None


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or x.device.type != "cpu" \
            or torch.is_autocast_enabled() or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return F.linear(x, weight, self.bias)
    held = self.__dict__.get(_PACKED)
    if held is None or held.stamp != _stamp(weight):
        changes = held.changes + 1 if held is not None else 0
        # a weight that keeps changing (merged and unmerged around every forward) stays plain
        held = _Held(_stamp(weight), _pack(self) if changes < MAX_CHANGES else None, changes)
        self.__dict__[_PACKED] = held  # a plain attribute: never in state_dict
    if held.packed is None:
        return F.linear(x, weight, self.bias)
    return torch.ops.mkl._mkl_linear(x, held.packed, weight, self.bias, PACK_ROWS)
