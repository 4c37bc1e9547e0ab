"""Mixed-adapter batches: one forward pass (or one generate()) where each row uses its own adapter.

    with deltatune.mixed_adapters(model, ["sst2", None, "qa"]):   # None: the bare base model
        model(input_ids)            # row 0 through "sst2", row 1 through the base, row 2 "qa"
        model.generate(input_ids)   # rows keep their adapter for the whole generation

LoRA (DoRA included) and (IA)³ can do this: their change is a per-row function of the layer's
input and base output (a low-rank update; DoRA's row factor, computed from weights alone; a
scaling vector), so rows of one batch can take different paths through the same frozen weights.
Prompt methods change the
sequence itself (virtual tokens / prefixes) and adapters insert modules on every row alike, so
they raise a one-line error. A LoRA adapter that trains whole modules (modules_to_save, e.g. a
classification head) works too: each row goes through its own adapter's copy of that module.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.base import ModuleCopy, delta_layers, delta_state, disabled
from deltatune.methods.lora import row_groups

MIXABLE_METHODS = ("lora", "ia3")


def check_mixable(model: nn.Module, names: Sequence[str | None]) -> tuple[str | None, ...]:
    """The names as a tuple, or a one-line error naming the first adapter that cannot mix."""
    if isinstance(names, str) or not isinstance(names, Sequence) or len(names) == 0:
        raise DeltatuneError(f"mixed_adapters: expected a list with one adapter name (or None) per "
                             f"batch row, got {names!r}")
    configs = delta_state(model).configs
    for name in names:
        if name is None:
            continue
        if name not in configs:
            raise DeltatuneError(f"mixed_adapters: no adapter named {name!r} on this model "
                                 f"(loaded: {', '.join(configs) or 'none'})")
        method = configs[name].method
        if method not in MIXABLE_METHODS:
            raise DeltatuneError(
                f"mixed_adapters: adapter {name!r} uses method {method!r}, which cannot vary per "
                f"batch row (only LoRA, DoRA and (IA)³ can); run its rows as a separate batch with set_adapter")
    return tuple(names)


def _per_row_module_copy(row_adapters: tuple[str | None, ...]):
    """A forward hook giving each row the output of its own adapter's copy of a module."""

    def hook(module: ModuleCopy, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            raise DeltatuneError(f"mixed_adapters: cannot split the inputs of "
                                 f"{type(module.base_layer).__name__} by row")
        inputs, rest = args[0], args[1:]
        result = output.clone()
        for name, rows in row_groups(row_adapters, inputs.shape[0], inputs.device):
            if name in module.deltas:
                copy = module.deltas[name]
                result.index_copy_(0, rows, copy(inputs.index_select(0, rows), *rest).to(result.dtype))
        return result

    return hook


@contextlib.contextmanager
def mixed_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, batch row i runs through adapter `names[i]` (None: the base model).

    Works for forward passes and for `model.generate(...)` (greedy, sampling, and also beams /
    num_return_sequences, whose copies of a row keep that row's adapter). Every other delta is
    switched off inside the block; the active adapter and any merged weights come back after.
    """
    row_adapters = check_mixable(model, names)
    layers = list(delta_layers(model))
    # A merged delta lives in the base weight and would reach every row: take it out meanwhile.
    merged = [layer for _, layer in layers if getattr(layer, "merged", None)]
    for layer in merged:
        layer.unmerge()
    hooks = []
    try:
        with disabled(model):  # base everywhere, except where a row names its adapter
            for _, layer in layers:
                if hasattr(layer, "row_adapters"):  # LoraLayer, IA3Layer: split by row themselves
                    layer.row_adapters = row_adapters
                elif isinstance(layer, ModuleCopy):
                    hooks.append(layer.register_forward_hook(_per_row_module_copy(row_adapters)))
            yield model
    finally:
        for handle in hooks:
            handle.remove()
        for _, layer in layers:
            if hasattr(layer, "row_adapters"):
                layer.row_adapters = None
        for layer in merged:
            layer.merge()
