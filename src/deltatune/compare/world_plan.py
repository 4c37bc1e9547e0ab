"""Per-process memory when a run is spread over N processes (`deltatune plan --world-size N`).

The one-process plan (compare/plan.py) is rescaled term by term, as the trainer spreads it:

    every rank takes 1/N of each global batch     -> activations / N (the heaviest batch's share)
    ddp   each rank holds the whole model, its gradients and AdamW moments, plus DDP's gradient
          buckets (one more copy of the gradients, flattened for the all-reduce)
    fsdp  each rank keeps 1/N of every weight (the frozen base included: the loaded model's
          bytes leave the baseline, and so do its memory-mapped file pages: the mapping is
          released once fully_shard has replaced every loaded tensor by its shard) and 1/N of
          the AdamW moments. The peak comes in the forward pass, with the activations of the
          rank's share of the batch alive (measured per phase on SmolLM2: the backward pass
          frees them faster than the reduce-scattered gradient shards grow). At that moment:
          no gradients (the trainer sets them to None after each step) unless gradients are
          being accumulated (train.grad_accum > 1: FSDP then keeps them unsharded, whole, until
          the last micro-batch); the tensors gathered for compute, in the compute dtype: the
          root module's own (embeddings, head, final norm; a tied head counts once; the root
          stays gathered for the whole step) and two layers (the one computing and the one
          prefetched); the runtime allowance per rank (its transient gradients and checkpoint
          buffers are shards too); activations at most SHARDED_RETENTION times.
    both  the process group's own buffers and threads (DIST_RUNTIME_BYTES)
"""
from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

DIST_RUNTIME_BYTES = 60 * 1024 * 1024
# Activations count at most this many times under fsdp: a CPU fsdp process fixes glibc's mmap
# threshold (training/sharding.py), so the freed blocks that plan.RETENTION stands for go back to
# the OS. Full fine-tuning's factor, measured to hold for LoRA too (SmolLM2, 2 ranks: 1416 MB
# peak, 1430 MB predicted with it, 1925 MB with LoRA's one-process 2.3).
SHARDED_RETENTION = 1.1


def _bytes(module: nn.Module, seen: set[int]) -> int:
    """Bytes of `module`'s own parameters not already in `seen` (tied weights count once)."""
    total = 0
    for p in module.parameters(recurse=False):
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def root_and_layer_bytes(adapted: nn.Module) -> tuple[int, int]:
    """(root weights, largest layer's weights) as loaded: what fully_shard gathers per group."""
    from deltatune.models import transformer_layers

    layers = list(transformer_layers(adapted))
    inside = {id(m) for layer in layers for m in layer.modules()}
    seen: set[int] = set()
    root = sum(_bytes(m, seen) for m in adapted.modules() if id(m) not in inside)
    return root, max((_layer_bytes(layer) for layer in layers), default=0)


def _layer_bytes(layer: nn.Module) -> int:
    seen: set[int] = set()
    return sum(_bytes(m, seen) for m in layer.modules())


def per_process(plan: Any, adapted: nn.Module, base_bytes: int, world_size: int, mode: str,
                bf16: bool, retention: float, allowance: int, grad_accum: int = 1) -> Any:
    """`plan` (a MethodPlan for one process) as each of `world_size` processes sees it.
    base_bytes: the loaded (un-adapted) model's weights, part of plan.baseline_bytes."""
    if world_size <= 1:
        return plan
    n = world_size
    delta = max(0, plan.weights_bytes - base_bytes) if plan.method != "full" else 0
    activations = plan.activation_bytes // n
    if mode == "fsdp":
        root, layer = root_and_layer_bytes(adapted)
        compute = 0.5 if bf16 else 1.0
        gathered = int(compute * (root + 2 * layer))
        baseline = plan.baseline_bytes - base_bytes + base_bytes // n
        gradients, optimizer = plan.gradient_bytes // n, plan.optimizer_bytes // n
        accumulating = plan.gradient_bytes if grad_accum > 1 else 0
        own = delta // n + optimizer + accumulating
        allowance //= n
        retention = min(retention, SHARDED_RETENTION)
    else:
        gathered = plan.gradient_bytes  # DDP's buckets
        baseline = plan.baseline_bytes
        own = delta + plan.gradient_bytes + plan.optimizer_bytes
        gradients, optimizer = plan.gradient_bytes, plan.optimizer_bytes
    peak = (baseline + own + gathered + retention * activations + allowance + DIST_RUNTIME_BYTES)
    return dataclasses.replace(plan, gradient_bytes=gradients, optimizer_bytes=optimizer,
                               activation_bytes=activations, baseline_bytes=baseline,
                               predicted_peak_bytes=int(peak))
