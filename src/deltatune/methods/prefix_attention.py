"""Attention with a per-layer key/value prefix, for prefix tuning / P-tuning v2.

The model is routed through an attention implementation registered with transformers
("deltatune_prefix_sdpa" / "_eager") that concatenates the layer's prefix to keys and values,
after the cache update and RoPE, opens n always-visible mask columns, then calls the real sdpa or
eager kernel. The cache never holds the prefix, so cached and uncached decoding see the same keys.
"""
from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.models import architecture_of, get_submodule, transformer_layers

PREFIX_ATTENTION = {"sdpa": "deltatune_prefix_sdpa", "eager": "deltatune_prefix_eager"}


# ------------------------------------------------------------------ model geometry
def attention_geometry(model: nn.Module) -> dict[str, int]:
    """layers, kv_heads, head_dim, hidden and max_positions (0: unbounded) of a transformers model."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"layers": len(transformer_layers(model)), "kv_heads": kv_heads, "head_dim": head_dim,
            "hidden": model.get_input_embeddings().weight.shape[1],
            "max_positions": getattr(config, "max_position_embeddings", None) or 0}


def self_attention_modules(model: nn.Module) -> list[nn.Module]:
    arch = architecture_of(model)
    modules = []
    for index, layer in enumerate(transformer_layers(model)):
        attention = get_submodule(layer, arch.attention)
        if attention is None:
            raise DeltatuneError(f"prefix tuning: layer {index} of this {arch.family} model has no "
                                 f"attention module at {arch.attention!r}")
        modules.append(attention)
    return modules


# ------------------------------------------------------------------ attention with a prefix
def _inner_attention(module: nn.Module, inner: str):
    if inner == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward
    return sys.modules[type(module).__module__].eager_attention_forward


def _prefix_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, n: int,
                 is_causal: bool, additive: bool) -> torch.Tensor:
    """The layer's mask with n always-visible columns in front (bool, or additive for eager)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if mask is None:
        # sdpa's own reading of "no mask": top-left causal when q > 1 (q == kv, or a static
        # cache's prefill whose later slots are empty), everything visible for a single query.
        if is_causal and q_len > 1:
            rows = torch.arange(q_len, device=query.device)[:, None]
            mask = rows >= torch.arange(kv_len, device=query.device)[None, :]
        else:
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device)
        mask = mask.view(1, 1, q_len, kv_len)
        if additive:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
    visible = (torch.zeros if mask.dtype != torch.bool else torch.ones)(
        (*mask.shape[:-1], n), dtype=mask.dtype, device=mask.device)
    return torch.cat([visible, mask], dim=-1)  # (batch|1, heads|1, q, n + kv)


def _prefixed_attention(inner: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        get_prefix = getattr(module, "deltatune_prefix", None)
        prefix = get_prefix() if get_prefix is not None else None
        if prefix is not None:
            prefix_keys, prefix_values = prefix  # (kv_heads, n, head_dim) each
            if prefix_keys.shape[0] != key.shape[1] or prefix_keys.shape[-1] != key.shape[-1]:
                raise DeltatuneError(
                    f"prefix tuning: prefix has {prefix_keys.shape[0]} heads of size "
                    f"{prefix_keys.shape[-1]} but {type(module).__name__} uses {key.shape[1]} of "
                    f"size {key.shape[-1]} — adapter made for another model?")
            batch = key.shape[0]
            key = torch.cat([prefix_keys.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
            value = torch.cat([prefix_values.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
            is_causal = kwargs.get("is_causal")
            is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
            attention_mask = _prefix_mask(attention_mask, query, key[:, :, prefix_keys.shape[1]:],
                                          prefix_keys.shape[1], is_causal, additive=inner == "eager")
        return _inner_attention(module, inner)(module, query, key, value, attention_mask, **kwargs)

    return attention


@functools.cache
def register_prefix_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    for inner, name in PREFIX_ATTENTION.items():
        AttentionInterface.register(name, _prefixed_attention(inner))
        AttentionMaskInterface.register(name, sdpa_mask if inner == "sdpa" else eager_mask)
