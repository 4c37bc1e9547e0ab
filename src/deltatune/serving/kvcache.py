"""The running batch's KV cache: one left-padded DynamicCache whose rows come and go.

Choice: a padded batched cache (not one cache per row). Every decoding step is then one forward
over all rows; rows that joined later sit behind zero-filled, masked-out columns on the left.

    join   new rows are prefilled together (their own left-padded cache), then both caches are
           padded on the left to the longer length and concatenated along the batch
    leave  finished rows are dropped with index_select, then columns that are padding in every
           remaining row are cut from the left, so the cache never grows past the longest row

Each row's positions come from its own attention mask (count of real tokens so far), so a row
sees exactly the positions and keys it would see alone: greedy tokens equal generate()'s.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from deltatune.errors import DeltatuneError


def new_cache(model) -> DynamicCache:
    return DynamicCache(config=model.config)


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers = list(cache.layers)
    for layer in layers:  # sliding windows or quantized caches keep state this code cannot move
        if type(layer) is not DynamicLayer:
            raise DeltatuneError(f"continuous batching needs a plain DynamicCache; this model uses "
                                 f"{type(layer).__name__} (serve it with --engine static)")
    return layers


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def merge(cache: DynamicCache | None, mask: torch.Tensor | None, new_cache: DynamicCache,
          new_mask: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """The running rows (`cache`, `mask`: (rows, length)) followed by the newly prefilled rows."""
    if cache is None or mask is None or mask.shape[0] == 0:
        return new_cache, new_mask
    width = max(mask.shape[1], new_mask.shape[1])
    for old, new in zip(_layers(cache), _layers(new_cache)):
        old.keys = torch.cat([_pad_left(old.keys, width, -2), _pad_left(new.keys, width, -2)])
        old.values = torch.cat([_pad_left(old.values, width, -2), _pad_left(new.values, width, -2)])
    return cache, torch.cat([_pad_left(mask, width, 1), _pad_left(new_mask, width, 1)])


def keep_rows(cache: DynamicCache, mask: torch.Tensor, rows: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    """Only `rows` (indices into the batch) stay; all-padding columns on the left go."""
    index = torch.tensor(rows, dtype=torch.long, device=mask.device)
    mask = mask.index_select(0, index)
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    mask = mask[:, start:]
    for layer in _layers(cache):
        layer.keys = layer.keys.index_select(0, index)[:, :, start:]
        layer.values = layer.values.index_select(0, index)[:, :, start:]
    return cache, mask


def positions(mask: torch.Tensor, new: int) -> torch.Tensor:
    """Position ids of the last `new` columns: each row counts only its own real tokens."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, -new:]
