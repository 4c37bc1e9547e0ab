"""The memory levers of a training step for long sequences, as the run config sets them
(`train.attention`, `gradient_checkpointing` with `checkpoint_bf16` / `checkpoint_offload`,
`mlp_tile_tokens`; `loss_chunk_tokens` goes to the loss). Each computes the same loss and
gradients as without it (tests/test_long_context_levers.py); docs/guides/long-context.md says
what each saves and costs.

    prepare_levers(model, train, device)          # once, before the optimizer
    with step_levers(model, train):               # around each micro-batch's forward + backward
        ...
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from deltatune.errors import DeltatuneError

from deltatune.config.run import ATTENTION  # noqa: F401  (the values train.attention takes)


def set_attention(model: nn.Module, choice: str) -> None:
    """`auto`: as loaded (transformers picks sdpa where the model has it). `sdpa`: PyTorch's fused
    kernels (flash / memory-efficient where the device has them), which keep the output and a
    log-sum-exp for backward, not the (heads, seq, seq) probabilities; padding-free rows of plain
    causal decoders then take the per-example path (packed_attention). `eager`: the model's own
    attention, whose probabilities are kept for backward (O(seq²) per layer)."""
    from deltatune.methods.prefix_attention import PREFIX_ATTENTION
    from deltatune.methods.virtual_tokens import CONTROLLER_ATTR

    current = getattr(model.config, "_attn_implementation", None)
    if choice == "auto" or current == choice:
        return
    controller = getattr(model, CONTROLLER_ATTR, None)
    if current in PREFIX_ATTENTION.values() and getattr(controller, "_routed_from", None):
        # prefix tuning routes attention through its own wrapper of sdpa or eager: switch the
        # wrapped one, and what unrouting restores
        model.config._attn_implementation = PREFIX_ATTENTION[choice]
        controller._routed_from = choice
        return
    try:
        model.set_attn_implementation(choice)
    except (ValueError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeltatuneError(f"train.attention: {choice} is not available for "
                             f"{type(model).__name__} ({first})") from exc


def prepare_levers(model: nn.Module, train: Any, device: torch.device) -> None:
    """Attention and checkpointing, as `train` says (before the optimizer and any wrapping)."""
    from deltatune.training.layer_checkpoint import enable_layer_checkpointing
    from deltatune.training.optimization import enable_gradient_checkpointing

    set_attention(model, getattr(train, "attention", "auto"))
    if not getattr(train, "gradient_checkpointing", False):
        return
    bf16, offload = getattr(train, "checkpoint_bf16", False), getattr(train, "checkpoint_offload", False)
    if offload and device.type != "cuda":
        raise DeltatuneError(f"train.checkpoint_offload: needs a CUDA device (this run trains on "
                             f"{device.type}); it moves layer inputs to pinned CPU memory")
    if bf16 or offload:
        enable_layer_checkpointing(model, bf16=bf16, offload=offload)
    else:
        enable_gradient_checkpointing(model)


@contextlib.contextmanager
def step_levers(model: nn.Module, train: Any) -> Iterator[None]:
    """The levers that route a step's modules while it runs (tiled feed-forward blocks)."""
    from deltatune.training.tiled_mlp import tiled_feed_forward

    with tiled_feed_forward(model, getattr(train, "mlp_tile_tokens", 0) or 0):
        yield
