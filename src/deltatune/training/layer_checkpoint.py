"""Gradient checkpointing that keeps each layer's input in a chosen form: bf16 (`train.
checkpoint_bf16`) and/or in pinned CPU memory on a CUDA device (`train.checkpoint_offload`).

With checkpointing, what a long sequence still keeps on the device is one hidden state per layer
(32 x 8k x 4096 fp32 values on Llama-3.1-8B: 4 GiB). Each layer here runs under torch's
non-reentrant checkpoint, as transformers' own checkpointing does, but what the checkpoint holds
is a compact copy of the layer's input made by `_Stow`; `_Unstow` brings it back to the layer's
device and dtype, in forward and again when backward recomputes the layer:

    hidden --_Stow--> stowed (bf16 and/or pinned CPU) --[checkpoint: _Unstow -> layer]--> output

Nothing else keeps the full input (the layer's own saved tensors are checkpoint placeholders),
so the device copy is freed as soon as the next layer has it. Gradients pass through both
functions unchanged (cast back to the input's dtype). Offloading alone is exact. bf16 is exact
when the input already is bf16 (under `train.bf16` with `frozen_bf16`, the residual stream is);
else forward and backward both see the input rounded to bf16: the same function, whose gradients
are exact for it, but whose loss differs from an fp32 run's by that rounding.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint



class _Stow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, dtype: torch.dtype | None, offload: bool):
        ctx.device, ctx.dtype = hidden.device, hidden.dtype
        stowed = hidden.to(dtype) if dtype is not None and hidden.is_floating_point() else hidden
        if offload:
            host = torch.empty(stowed.shape, dtype=stowed.dtype, device="cpu",
                               pin_memory=torch.cuda.is_available())
            stowed = host.copy_(stowed, non_blocking=True)  # ordered before later device work
        elif stowed is hidden:
            stowed = hidden.view_as(hidden)  # a function may not return its input itself
        return stowed

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.device, ctx.dtype), None, None


class _Unstow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stowed: torch.Tensor, device: torch.device, dtype: torch.dtype):
        ctx.device, ctx.dtype = stowed.device, stowed.dtype
        return stowed.to(device, dtype, non_blocking=True)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.device, ctx.dtype), None, None


def _checkpointed(original, dtype: torch.dtype | None, offload: bool, hidden: torch.Tensor,
                  *args, **kwargs):
    if not torch.is_grad_enabled():
        return original(hidden, *args, **kwargs)
    device, own_dtype = hidden.device, hidden.dtype
    stowed = _Stow.apply(hidden, dtype, offload)

    def run(stowed: torch.Tensor, *args, **kwargs):
        return original(_Unstow.apply(stowed, device, own_dtype), *args, **kwargs)

    return checkpoint(run, stowed, *args, use_reentrant=False, **kwargs)


def enable_layer_checkpointing(model: nn.Module, bf16: bool = False, offload: bool = False) -> int:
    """Checkpoint every transformer layer, keeping its input as `bf16` / `offload` say; returns
    how many layers. transformers' own checkpointing is turned off (it would checkpoint twice).
    On a CPU-only torch, `offload` keeps a second CPU copy (what the tests check the arithmetic
    with); the trainer refuses it on a CPU device."""
    from deltatune.models import transformer_layers

    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    layers = transformer_layers(model)
    for layer in layers:
        previous = layer.forward  # the class's, or an instance attribute set before
        layer.forward = functools.partial(_checkpointed, previous, torch.bfloat16 if bf16 else None,
                                          offload)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return len(layers)
