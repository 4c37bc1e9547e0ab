"""Mixed-adapter batches: one forward pass (or one generate()) where each row uses its own adapter.

    with deltatune.mixed_adapters(model, ["sst2", None, "qa"]):   # None: the bare base model
        model(input_ids)            # row 0 through "sst2", row 1 through the base, row 2 "qa"
        model.generate(input_ids)   # rows keep their adapter for the whole generation

PEFT's spelling does the same thing through the same code: every model that carries a delta
takes `model(input_ids, adapter_names=[...])` and `model.generate(..., adapter_names=[...])`,
which run that one call inside `mixed_adapters` (see `install_adapter_names`).

LoRA (DoRA included), (IA)³, OFT, BOFT, LoHa, LoKr, VeRA, AdaLoRA, BitFit and LayerNorm tuning can
do this: their change is a per-row function of the layer's input and base output (a low-rank
update; DoRA's row factor, computed from weights alone; a scaling vector; a rotation of the input;
a dense update; a bias offset; a norm applied to each token alone), so rows of one batch can take
different paths through the same frozen weights.
Prompt methods change the
sequence itself (virtual tokens / prefixes) and adapters insert modules on every row alike, so
they raise a one-line error. A LoRA adapter that trains whole modules (modules_to_save, e.g. a
classification head) works too: each row goes through its own adapter's copy of that module.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator, Sequence

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.base import ModuleCopy, cached_delta_layers, delta_state, disabled
from deltatune.methods.lora_rows import row_groups

MIXABLE_METHODS = ("lora", "ia3", "oft", "boft", "loha", "lokr", "vera", "adalora", "bitfit", "ln-tuning")


def check_mixable(model: nn.Module, names: Sequence[str | None],
                  what: str = "mixed_adapters") -> tuple[str | None, ...]:
    """The names as a tuple, or a one-line error naming the first adapter that cannot mix."""
    if isinstance(names, str) or not isinstance(names, Sequence) or len(names) == 0:
        raise DeltatuneError(f"{what}: expected a list with one adapter name (or None) per "
                             f"batch row, got {names!r}")
    configs = delta_state(model).configs
    for name in names:
        if name is None:
            continue
        if name not in configs:
            raise DeltatuneError(f"{what}: no adapter named {name!r} on this model "
                                 f"(loaded: {', '.join(configs) or 'none'})")
        method = configs[name].method
        if method not in MIXABLE_METHODS:
            raise DeltatuneError(
                f"{what}: adapter {name!r} uses method {method!r}, which cannot vary per "
                f"batch row (only LoRA, DoRA, (IA)³, OFT, BOFT, LoHa, LoKr, VeRA, AdaLoRA, BitFit and LN "
                f"tuning can); run its rows as a separate batch with set_adapter")
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
    layers = cached_delta_layers(model)  # entered once per decoding step when serving
    # A merged delta lives in the base weight and would reach every row: take it out meanwhile.
    merged = [layer for _, layer in layers if getattr(layer, "merged", None)]
    for layer in merged:
        layer.unmerge()
    hooks = []
    try:
        with disabled(model, layers):  # base everywhere, except where a row names its adapter
            for _, layer in layers:
                if hasattr(layer, "row_adapters"):  # LoraLayer, IA3Layer, ...: split by row themselves
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


# ------------------------------------------------------------------ adapter_names= (PEFT's spelling)
# The hooks are module-level functions bound to nothing but the module they receive, so a
# deepcopy of the model carries working hooks of its own.
_OPEN = "_deltatune_adapter_names_block"   # the mixed_adapters block of the forward in progress
_HANDLES = "_deltatune_adapter_names_hooks"


def _batch_rows(args: tuple, kwargs: dict) -> int | None:
    """Rows of the call's input (input_ids / inputs_embeds / inputs / first positional)."""
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), kwargs.get("inputs"),
                  args[0] if args else None):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    return None


def _checked_names(model: nn.Module, names, args: tuple, kwargs: dict) -> tuple[str | None, ...]:
    # A second block inside a first would, on leaving, switch the first one's rows off.
    if model.__dict__.get(_OPEN) is not None or any(
            getattr(layer, "row_adapters", None) is not None for _, layer in cached_delta_layers(model)):
        raise DeltatuneError("adapter_names: this model is already running a mixed batch (inside "
                             "mixed_adapters, or another call with adapter_names)")
    row_adapters = check_mixable(model, names, what="adapter_names")
    rows = _batch_rows(args, kwargs)
    # Exactly one name per input row: mixed_adapters alone would also accept a divisor (its
    # generate() expands rows into copies), which for a direct call would hide a wrong length.
    if rows is not None and rows != len(row_adapters):
        raise DeltatuneError(f"adapter_names: {len(row_adapters)} names for a batch of {rows} rows "
                             f"(give one adapter name, or None for the base model, per row)")
    return row_adapters


def _before_forward(model: nn.Module, args: tuple, kwargs: dict):
    if "adapter_names" not in kwargs:
        return None
    names = kwargs.pop("adapter_names")
    if names is None:  # PEFT: None means "the usual active adapter"
        return args, kwargs
    row_adapters = _checked_names(model, names, args, kwargs)
    block = contextlib.ExitStack()
    block.enter_context(mixed_adapters(model, row_adapters))
    model.__dict__[_OPEN] = block
    return args, kwargs


def _after_forward(model: nn.Module, args: tuple, output):
    block = model.__dict__.pop(_OPEN, None)  # also runs when the forward raised (always_call)
    if block is not None:
        block.close()


def _generate(self: nn.Module, *args, adapter_names: Sequence[str | None] | None = None, **kwargs):
    generate = type(self).generate  # transformers' own; it rejects keywords forward() lacks
    if adapter_names is None:
        return generate(self, *args, **kwargs)
    with mixed_adapters(self, _checked_names(self, adapter_names, args, kwargs)):
        return generate(self, *args, **kwargs)


def install_adapter_names(model: nn.Module) -> None:
    """Make `model(..., adapter_names=[...])` and `model.generate(..., adapter_names=[...])` run
    that call inside `mixed_adapters(model, adapter_names)`; once per model, from `apply`.

    Installed for every method, so that a method which cannot mix rows refuses the keyword in one
    line instead of letting transformers' `**kwargs` swallow it unused.
    """
    if getattr(model, _HANDLES, None):
        return
    setattr(model, _HANDLES, [
        model.register_forward_pre_hook(_before_forward, with_kwargs=True, prepend=True),
        model.register_forward_hook(_after_forward, always_call=True)])
    if hasattr(type(model), "generate"):
        model.generate = types.MethodType(_generate, model)


def remove_adapter_names(model: nn.Module) -> None:
    """Undo `install_adapter_names` (merge_and_unload: a plain transformers model again)."""
    for handle in model.__dict__.pop(_HANDLES, None) or []:
        handle.remove()
    model.__dict__.pop("generate", None)
