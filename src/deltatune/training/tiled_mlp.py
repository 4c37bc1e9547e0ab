"""`train.mlp_tile_tokens`: each layer's feed-forward block computed in sequence tiles,
recomputed tile by tile in backward.

A feed-forward block works on every token alone, so cutting the sequence into tiles gives the same
numbers. What it saves is memory: at 4k tokens a Llama-3.1-8B MLP's SwiGLU intermediates are
3 x 4096 x 14,336 values per layer. Each tile runs under activation checkpointing: its
intermediates are never kept for backward, and in backward only one tile's exist at a time.
The cost is the block's forward once more (about a third of its products).

    with tiled_feed_forward(model, tile_tokens=2048):   # forward and backward inside
        loss = ...; loss.backward()

The blocks are found per transformer layer: its `mlp` module (Llama, Mistral, Qwen, GPT-2), or
BERT's `feed_forward_chunk` (intermediate + output, whose input is the attention output). With
dropout in the block, the masks are drawn per tile (the same distribution, other draws).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def tiled(forward: Callable[[torch.Tensor], torch.Tensor], tile_tokens: int,
          hidden: torch.Tensor) -> torch.Tensor:
    """forward(hidden) computed on tiles of `tile_tokens` positions (dim -2) and concatenated."""
    length = hidden.shape[-2]
    if length <= tile_tokens:
        return forward(hidden)
    parts = []
    for start in range(0, length, tile_tokens):
        # contiguous: some blocks view their input flat (GPT-2's Conv1D); with one row (the
        # long-sequence case) a tile already is, and no copy is made
        part = hidden.narrow(-2, start, min(tile_tokens, length - start)).contiguous()
        parts.append(checkpoint(forward, part, use_reentrant=False) if torch.is_grad_enabled()
                     else forward(part))
    return torch.cat(parts, dim=-2)


def feed_forward_blocks(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(owner, attribute) of every layer's feed-forward callable: `layer.mlp` or BERT's
    `layer.feed_forward_chunk`."""
    from deltatune.models import transformer_layers

    blocks = []
    for layer in transformer_layers(model):
        if isinstance(getattr(layer, "mlp", None), nn.Module):
            blocks.append((layer.mlp, "forward"))
        elif callable(getattr(layer, "feed_forward_chunk", None)):
            blocks.append((layer, "feed_forward_chunk"))
    return blocks


@contextlib.contextmanager
def tiled_feed_forward(model: nn.Module, tile_tokens: int) -> Iterator[int]:
    """Inside the block, every feed-forward block of the model runs in tiles of `tile_tokens`
    (0: unchanged); yields how many blocks were tiled."""
    if not tile_tokens:
        yield 0
        return
    routed = []
    for owner, name in feed_forward_blocks(model):
        own = name in vars(owner)  # an instance attribute already (compiled, or another wrapper)
        previous = getattr(owner, name)
        setattr(owner, name, functools.partial(tiled, previous, tile_tokens))
        routed.append((owner, name, own, previous))
    try:
        yield len(routed)
    finally:
        for owner, name, own, previous in reversed(routed):
            if own:
                setattr(owner, name, previous)
            else:
                delattr(owner, name)
