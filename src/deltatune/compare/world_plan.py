"""Per-process memory when a run is spread over N processes (`deltatune plan --world-size N`).

The one-process plan (compare/plan.py) is rescaled term by term, as the trainer spreads it:

    every rank takes 1/N of each global batch     -> activations / N (the heaviest batch's share)
    ddp   each rank holds the whole model, its gradients and AdamW moments, plus DDP's gradient
          buckets (one more copy of the gradients, flattened for the all-reduce)
    fsdp  each rank keeps 1/N of every weight (the frozen base included: the loaded model's
          bytes leave the baseline), of the gradients and of the moments; on top, the tensors
          gathered for compute: the root module's own (embeddings, head, final norm: the root
          stays gathered for the whole step) and two layers at a time (the one computing and
          the one prefetched), in the compute dtype, plus the gradients of one layer and the
          root before they are reduce-scattered.
    both  the process group's own buffers and threads (DIST_RUNTIME_BYTES)
"""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

DIST_RUNTIME_BYTES = 60 * 1024 * 1024


def _bytes(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False)
               if p.requires_grad or not trainable_only)


def _root_and_layer_bytes(adapted: nn.Module) -> tuple[int, int, int, int]:
    """(root weights, largest layer's weights, root trainable, largest layer's trainable) in fp32."""
    from deltatune.models import transformer_layers

    layers = list(transformer_layers(adapted))
    inside = {id(m) for layer in layers for m in layer.modules()}
    root = sum(_bytes(m) for m in adapted.modules() if id(m) not in inside)
    root_trainable = sum(_bytes(m, True) for m in adapted.modules() if id(m) not in inside)
    layer = max((sum(_bytes(m) for m in layer.modules()) for layer in layers), default=0)
    layer_trainable = max((sum(_bytes(m, True) for m in layer.modules()) for layer in layers), default=0)
    return root, layer, root_trainable, layer_trainable


def per_process(plan: Any, adapted: nn.Module, base_bytes: int, world_size: int, mode: str,
                bf16: bool, retention: float, allowance: int) -> Any:
    """`plan` (a MethodPlan for one process) as each of `world_size` processes sees it.
    base_bytes: the loaded (un-adapted) model's weights, part of plan.baseline_bytes."""
    if world_size <= 1:
        return plan
    n = world_size
    delta = max(0, plan.weights_bytes - base_bytes) if plan.method != "full" else 0
    activations = plan.activation_bytes // n
    if mode == "fsdp":
        root, layer, root_grad, layer_grad = _root_and_layer_bytes(adapted)
        compute = 0.5 if bf16 else 1.0
        gathered = int(compute * (root + 2 * layer)) + root_grad + layer_grad
        baseline = plan.baseline_bytes - base_bytes + base_bytes // n
        own = (delta + plan.gradient_bytes + plan.optimizer_bytes) // n
        gradients, optimizer = plan.gradient_bytes // n, plan.optimizer_bytes // n
    else:
        gathered = plan.gradient_bytes  # DDP's buckets
        baseline = plan.baseline_bytes
        own = delta + plan.gradient_bytes + plan.optimizer_bytes
        gradients, optimizer = plan.gradient_bytes, plan.optimizer_bytes
    peak = (baseline + own + gathered + retention * activations + allowance + DIST_RUNTIME_BYTES)
    return dataclasses.replace(plan, gradient_bytes=gradients, optimizer_bytes=optimizer,
                               activation_bytes=activations, baseline_bytes=baseline,
                               predicted_peak_bytes=int(peak))
