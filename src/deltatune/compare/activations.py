"""What one training step of an adapted model keeps alive: the bytes autograd saves for backward
(measured, under the run's levers), the inputs bitsandbytes' 8-bit layers keep beside them, and
the loss's logits chunk. compare/plan.py and compare/max_length.py build their predictions on it.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from deltatune.models import transformer_layers
from deltatune.quantization import is_quantized_linear

LOGIT_COPIES = 3  # a chunk's logits, its log-sum-exp pass and softmax - onehot


def saved_for_backward_bytes(model: nn.Module, task: str, batch: dict, packed: bool,
                             bf16: bool) -> int:
    """Bytes autograd keeps for backward after one training forward + loss of `batch`."""
    return sum(saved_bytes_by_kind(model, task, batch, packed, bf16))


def saved_bytes_by_kind(model: nn.Module, task: str, batch: dict, packed: bool,
                        bf16: bool, train: Any = None) -> tuple[int, int]:
    """(bytes autograd saves for backward, bytes of the inputs that bitsandbytes' 8-bit layers
    keep beside them) after one training forward + loss of `batch`; a storage counts once.
    `train`: the run's levers that route a step (tiled feed-forward blocks, the loss's chunk)."""
    from deltatune.training.levers import step_levers
    from deltatune.training.losses import CHUNK_ROWS, batch_loss
    from deltatune.training.packed_attention import packed_attention

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    inputs: dict[int, int] = {}

    def keep(tensor: torch.Tensor, into: dict[int, int] = saved) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            into[storage.data_ptr()] = storage.nbytes()
        # Detached: the graph then holds the memory (so no later tensor reuses an address
        # counted here) without a tensor that points back into the graph, a cycle Python's
        # garbage collector cannot see (it kept every planned method's activations alive).
        return tensor.detach()

    def input_kept(module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled() and args[0].requires_grad:  # else autograd keeps no node
            keep(args[0], inputs)

    # bitsandbytes' 8-bit layers train on CPU through MatMul8bitFp, which keeps its input as an
    # attribute of the autograd context (`ctx.A`), out of saved_tensors_hooks' sight
    hooks = [m.register_forward_pre_hook(input_kept) for m in model.modules()
             if type(m).__name__ == "Linear8bitLt" and is_quantized_linear(m)]
    model.train()
    attention = packed_attention(model) if packed else contextlib.nullcontext()
    levers = step_levers(model, train) if train is not None else contextlib.nullcontext()
    chunk = getattr(train, "loss_chunk_tokens", CHUNK_ROWS)
    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), attention, \
                levers, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = batch_loss(model, task, batch, chunk_rows=chunk)
        del loss  # frees the graph and everything it saved
    finally:
        for hook in hooks:
            hook.remove()
    return sum(saved.values()), sum(n for ptr, n in inputs.items() if ptr not in saved)


def logit_bytes(model: nn.Module, task: str, batch: dict, chunk_rows: int | None = None) -> int:
    """The chunk of LM-head logits alive while the loss runs (causal LM only); chunk_rows:
    train.loss_chunk_tokens (0: every labelled row at once)."""
    from deltatune.training.losses import CHUNK_ROWS, IGNORE_INDEX

    if task != "causal-lm":
        return 0
    labelled = int((batch["labels"] != IGNORE_INDEX).sum())
    chunk = CHUNK_ROWS if chunk_rows is None else chunk_rows or labelled
    return min(labelled, chunk) * getattr(model.config, "vocab_size", 0) * 4 * LOGIT_COPIES


def activation_terms(adapted: nn.Module, task: str, batch: dict, train: Any, packed: bool,
                     bf16: bool) -> tuple[int, int, int]:
    """(saved for backward, inputs 8-bit layers keep, the loss's logits chunk) of one training
    step on `batch`, under the run's levers. With gradient checkpointing only each layer's input
    is kept (2 bytes a value with checkpoint_bf16, none on the device when offloaded), and one
    layer's activations exist again in backward."""
    saved, kept_inputs = saved_bytes_by_kind(adapted, task, batch, packed, bf16, train)
    if getattr(train, "gradient_checkpointing", False):
        layers = max(1, len(transformer_layers(adapted)))
        tokens = int(batch["input_ids"].numel())
        width = 2 if getattr(train, "checkpoint_bf16", False) else 4
        if getattr(train, "checkpoint_offload", False):
            width = 0
        saved = saved // layers + layers * tokens * adapted.config.hidden_size * width
    return saved, kept_inputs, logit_bytes(adapted, task, batch, getattr(train, "loss_chunk_tokens", None))
