"""Prefix tuning (Li & Liang 2021) / P-tuning v2 (Liu et al. 2022): learned key/value prefixes.

Every layer's self-attention gets n extra keys and values in front of the real ones (deep
prompts); `virtual_tokens` injects them inside the attention call, so encoders need no
`past_key_values` and the KV cache never holds them. Shapes follow the attention's key/value
heads, so grouped-query attention (kv_heads < heads) stores only kv_heads·head_dim per layer.

    plain:       prefix = table                       table: (n, layers·2·kv_heads·head_dim)
    projection:  prefix = W₂ tanh(W₁ table + b₁) + b₂  table: (n, kv_heads·head_dim)

The projection (Li & Liang's reparameterisation) steadies training and is folded into plain
prefixes at save time (PEFT's `prompt_embeddings`), so inference never runs the MLP.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltatune.methods.base import MethodConfig
from deltatune.methods.prefix_attention import attention_geometry
from deltatune.methods.virtual_tokens import VirtualTokens, attach
from deltatune.methods.virtual_tokens_io import (WHY_NO_MERGE, common_peft_fields, load_virtual_state_dict,
                                validate_num_virtual_tokens, virtual_state_dict)


@dataclass
class PrefixConfig(MethodConfig):
    method = "prefix"
    peft_type = "PREFIX_TUNING"

    num_virtual_tokens: int = 20
    # Train through a two-layer tanh MLP (Li & Liang). Off by default: on MiniLM/SST-2 (standard
    # budget) plain prefixes at lr 3e-2 reached 81.1% while the MLP at lr 1e-2 did not learn (50.9%).
    projection: bool = False
    projection_hidden_size: int | None = None  # MLP width; default kv_heads·head_dim (as PEFT)

    def validate(self) -> None:
        super().validate()
        validate_num_virtual_tokens(self)
        if not isinstance(self.projection, bool):
            self.fail("projection", f"must be true or false, got {self.projection!r}")
        if self.projection_hidden_size is not None and (
                not isinstance(self.projection_hidden_size, int) or self.projection_hidden_size <= 0):
            self.fail("projection_hidden_size",
                      f"must be a positive integer, got {self.projection_hidden_size!r}")


def prefix_dims(model: nn.Module) -> tuple[int, int]:
    """(kv_dim, flat): one layer's key width kv_heads·head_dim, and layers·2·kv_dim."""
    g = attention_geometry(model)
    kv_dim = g["kv_heads"] * g["head_dim"]
    return kv_dim, g["layers"] * 2 * kv_dim


def projection_hidden_size(model: nn.Module, config: PrefixConfig) -> int:
    return config.projection_hidden_size or prefix_dims(model)[0]


def apply_prefix(model: nn.Module, config: PrefixConfig, name: str) -> None:
    kv_dim, flat = prefix_dims(model)
    n = config.num_virtual_tokens
    if config.projection:
        hidden = projection_hidden_size(model, config)
        projection = nn.Sequential(nn.Linear(kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, flat))
        source = VirtualTokens("prefix", torch.randn(n, kv_dim), projection)
    else:
        source = VirtualTokens("prefix", torch.randn(n, flat))
    attach(model, name, source)


def prefix_to_peft(config: PrefixConfig, model: nn.Module, name: str) -> dict:
    g = attention_geometry(model)
    kv_dim, _ = prefix_dims(model)
    # PEFT sizes prefixes by key/value heads: token_dim = kv_heads·head_dim (see its GQA handling).
    return {**common_peft_fields(model, config.num_virtual_tokens), "token_dim": kv_dim,
            "num_attention_heads": g["kv_heads"], "prefix_projection": config.projection,
            "encoder_hidden_size": projection_hidden_size(model, config)}


def prefix_from_peft(values: dict) -> PrefixConfig:
    return PrefixConfig(num_virtual_tokens=values["num_virtual_tokens"],
                        projection=bool(values.get("prefix_projection", False)),
                        projection_hidden_size=values.get("encoder_hidden_size"),
                        modules_to_save=values.get("modules_to_save"))


from deltatune.methods import Method  # noqa: E402  (the registry imports this module)

METHOD = Method(name="prefix", config=PrefixConfig, apply=apply_prefix, to_peft=prefix_to_peft,
                from_peft=prefix_from_peft, state_dict=virtual_state_dict,
                load_state_dict=load_virtual_state_dict, why_no_merge=WHY_NO_MERGE, default_lr=3e-2)
