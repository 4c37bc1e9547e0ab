"""What one training step of an adapted model keeps alive: the bytes autograd saves for backward
(measured, under the run's levers, split into the transformer layers' share and the rest), the
inputs bitsandbytes' 8-bit layers keep beside them, and the loss's logits chunk.
compare/plan.py and compare/max_length.py build their predictions on it.

Under gradient checkpointing a step's peak (step_activation_bytes) is the larger of two moments,
above what every layer keeps from the forward (its checkpointed input, and the heap blocks its
freed activations leave behind: HEAP_STREAMS):

    the loss     every labelled row's hidden state and its gradient, and one chunk of logits
    backward     one layer recomputed: its saved activations and, beside them, their gradients
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from torch import nn

from deltatune.models import transformer_layers
from deltatune.quantization import is_quantized_linear

# The loss works one chunk's fp32 (rows, vocab) buffer in place (logits, then softmax - onehot)
# and frees it before the next chunk's; under bf16 the matmul's bf16 output, and later the
# gradient's bf16 copy, sit beside it: LOGIT_COPIES fp32-sized copies at the loss's peak
# (training/losses.py).
LOGIT_COPIES = {False: 1.0, True: 1.5}   # by whether the loss computes in bf16
# Under checkpointing each layer's forward still computes all its activations, then frees them,
# and its output (the next layer's checkpointed input) is allocated among them: glibc's heap
# cannot shrink below a live block, so each layer leaves behind about HEAP_STREAMS more
# hidden-state-sized blocks (tokens x hidden x the stream's bytes) that stay resident for the
# rest of the step. Blocks of MMAP_THRESHOLD_MAX bytes or more never enter the heap (glibc maps
# each on its own and unmaps it when freed), so from that length on a layer keeps its input only.
# Measured as the difference of one-step peaks of 2, 4 and 8-layer models of Llama-3.2-1B's
# width and of SmolLM2-135M (benchmarks/memory/report.md "What a checkpointed step keeps").
HEAP_STREAMS = 5.0
MMAP_THRESHOLD_MAX = 32 * 2**20


@dataclasses.dataclass
class SavedBytes:
    """What autograd saves for backward in one training forward + loss (no checkpointing)."""
    total: int = 0          # every saved storage, once (parameters excluded)
    kept_inputs: int = 0    # inputs bitsandbytes' 8-bit layers keep out of the hooks' sight
    one_layer: int = 0      # the heaviest transformer layer's share of `total`
    outside: int = 0        # saved outside the layers: embeddings, final norm, the loss's gradient
    layers: int = 0         # transformer layers
    input_width: int = 0    # bytes a value of a layer's input (the residual stream's dtype)

    def scaled(self, values: dict[str, float]) -> "SavedBytes":
        return dataclasses.replace(self, **{k: int(max(0.0, v)) for k, v in values.items()})


def saved_for_backward_bytes(model: nn.Module, task: str, batch: dict, packed: bool,
                             bf16: bool) -> int:
    """Bytes autograd keeps for backward after one training forward + loss of `batch`."""
    return sum(saved_bytes_by_kind(model, task, batch, packed, bf16))


def saved_bytes_by_kind(model: nn.Module, task: str, batch: dict, packed: bool,
                        bf16: bool, train: Any = None) -> tuple[int, int]:
    """(bytes autograd saves for backward, bytes of the inputs that bitsandbytes' 8-bit layers
    keep beside them) after one training forward + loss of `batch`; a storage counts once.
    `train`: the run's levers that route a step (tiled feed-forward blocks, the loss's chunk)."""
    measured = measure_saved(model, task, batch, packed, bf16, train)
    return measured.total, measured.kept_inputs


def measure_saved(model: nn.Module, task: str, batch: dict, packed: bool, bf16: bool,
                  train: Any = None) -> SavedBytes:
    """saved_bytes_by_kind's bytes, with the transformer layers' share told apart: each saved
    storage is credited to the layer whose forward saved it, or to the rest of the model."""
    from deltatune.training.levers import step_levers
    from deltatune.training.losses import CHUNK_ROWS, batch_loss
    from deltatune.training.packed_attention import packed_attention

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple[int, int]] = {}  # storage -> (bytes, layer index or -1)
    inputs: dict[int, int] = {}
    current = [-1]
    widths: list[int] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.data_ptr() not in saved:
            saved[storage.data_ptr()] = (storage.nbytes(), current[0])
        # Detached: the graph then holds the memory (so no later tensor reuses an address
        # counted here) without a tensor that points back into the graph, a cycle Python's
        # garbage collector cannot see (it kept every planned method's activations alive).
        return tensor.detach()

    def input_kept(module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled() and args[0].requires_grad:  # else autograd keeps no node
            storage = args[0].untyped_storage()
            inputs[storage.data_ptr()] = storage.nbytes()

    def entering(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            current[0] = index
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor) and hidden.is_floating_point():
                widths.append(hidden.element_size())
        return hook

    def leaving(module: nn.Module, args: tuple, output: Any) -> None:
        current[0] = -1

    layers = list(transformer_layers(model))
    # bitsandbytes' 8-bit layers train on CPU through MatMul8bitFp, which keeps its input as an
    # attribute of the autograd context (`ctx.A`), out of saved_tensors_hooks' sight
    hooks = [m.register_forward_pre_hook(input_kept) for m in model.modules()
             if type(m).__name__ == "Linear8bitLt" and is_quantized_linear(m)]
    for index, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(entering(index), with_kwargs=True))
        hooks.append(layer.register_forward_hook(leaving))
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
    per_layer = [0] * len(layers)
    for nbytes, index in saved.values():
        if index >= 0:
            per_layer[index] += nbytes
    total = sum(nbytes for nbytes, _ in saved.values())
    return SavedBytes(total=total, kept_inputs=sum(n for ptr, n in inputs.items() if ptr not in saved),
                      one_layer=max(per_layer, default=0), outside=total - sum(per_layer),
                      layers=len(layers), input_width=max(widths, default=4))


def logit_bytes(model: nn.Module, task: str, batch: dict, chunk_rows: int | None = None,
                bf16: bool = False) -> int:
    """The chunk of LM-head logits alive while the loss runs (causal LM only); chunk_rows:
    train.loss_chunk_tokens (0: every labelled row at once)."""
    from deltatune.training.losses import IGNORE_INDEX

    if task != "causal-lm":
        return 0
    labelled = int((batch["labels"] != IGNORE_INDEX).sum())
    return chunk_logit_bytes(labelled, getattr(model.config, "vocab_size", 0), chunk_rows, bf16)


def chunk_logit_bytes(labelled: int, vocab: int, chunk_rows: int | None = None,
                      bf16: bool = False) -> int:
    """The loss's logits at their peak for `labelled` rows: one chunk's LOGIT_COPIES."""
    from deltatune.training.losses import CHUNK_ROWS

    chunk = CHUNK_ROWS if chunk_rows is None else chunk_rows or labelled
    copies = LOGIT_COPIES[bool(bf16)]
    return int(min(labelled, chunk) * vocab * 4 * copies)


def checkpoint_width(train: Any, measured: SavedBytes) -> int:
    """Bytes a value of each checkpointed layer input: the residual stream's own, 2 with
    checkpoint_bf16, none on the device when offloaded."""
    if getattr(train, "checkpoint_offload", False):
        return 0
    width = measured.input_width or 4
    return min(width, 2) if getattr(train, "checkpoint_bf16", False) else width


def step_activation_bytes(measured: SavedBytes, tokens: int, hidden: int, logits: int,
                          factor: float, train: Any, layers: int | None = None) -> int:
    """The activations' share of a step's peak: `factor` times what autograd saves (the
    allocator's share and backward's gradients beside it: plan's retention, max_length's
    ONE_STEP_FACTOR), the inputs 8-bit layers keep, and the loss's logits chunk.
    With gradient checkpointing: what every layer keeps from the forward (its input, and the
    heap blocks its freed activations leave: HEAP_STREAMS), and the larger of the loss's moment (its rows' hidden states and
    gradient, the logits chunk) and backward's (one layer recomputed beside the rest).
    `layers`: the model's depth when `measured` comes from a shallower copy of it."""
    if not getattr(train, "gradient_checkpointing", False):
        return int(factor * measured.total + measured.kept_inputs + logits)
    layers = measured.layers if layers is None else layers
    stream = tokens * hidden * (measured.input_width or 4)  # one hidden-state-sized block
    stowed = tokens * hidden * checkpoint_width(train, measured)
    kept = layers * (stowed + (HEAP_STREAMS * stream if stream < MMAP_THRESHOLD_MAX else 0))
    loss = logits + factor * measured.outside
    backward = factor * (measured.one_layer + measured.outside)
    return int(kept + max(loss, backward) + measured.kept_inputs)


def activation_terms(adapted: nn.Module, task: str, batch: dict, train: Any, packed: bool,
                     bf16: bool) -> tuple[SavedBytes, int]:
    """(what autograd saves, split by layer; the loss's logits chunk) of one training step on
    `batch`, under the run's levers (step_activation_bytes turns them into the peak's share)."""
    measured = measure_saved(adapted, task, batch, packed, bf16, train)
    chunk = getattr(train, "loss_chunk_tokens", None)
    return measured, logit_bytes(adapted, task, batch, chunk, bf16)
