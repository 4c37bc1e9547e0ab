"""Combine several LoRA adapters on one model into a new one (task arithmetic, adapter merging).

Three ways, per wrapped layer, with ΔW_i = scale_i · B_i · A_i and weights w_i:

    linear  A = Σ √(|w_i|·scale_i) · A_i,   B = Σ sign(w_i)·√(|w_i|·scale_i) · B_i   (equal ranks)
            cheap and rank-preserving, but B·A then holds cross terms B_i·A_j: it is NOT Σ w_i ΔW_i
            unless a single adapter is combined.
    cat     A = [A_1; A_2; ...],  B = [w_1·scale_1·B_1, w_2·scale_2·B_2, ...]  (ranks concatenated)
            exactly Σ w_i ΔW_i, at rank Σ r_i.
    svd     the best rank-k approximation of Σ w_i ΔW_i (truncated SVD), k = max r_i by default;
            exact when k reaches the rank of the sum.

The new adapter has scale 1 (alpha = r, no rsLoRA): each method folds the scales into A and B.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import torch
from torch import nn

from deltatune.deltas import apply, set_adapter
from deltatune.errors import DeltatuneError
from deltatune.methods.base import delta_state
from deltatune.methods.lora import LoraConfig, LoraLayer, in_out_features, lora_layers

HOWS = ("linear", "cat", "svd")


def _check(model: nn.Module, names: Sequence[str], weights: Sequence[float], how: str,
           new_name: str) -> list[LoraConfig]:
    configs = delta_state(model).configs
    if how not in HOWS:
        raise DeltatuneError(f"combine_adapters: how must be one of {', '.join(HOWS)}, got {how!r}")
    if isinstance(names, str) or not names:
        raise DeltatuneError(f"combine_adapters: names must be a non-empty list, got {names!r}")
    if len(weights) != len(names):
        raise DeltatuneError(f"combine_adapters: {len(names)} names but {len(weights)} weights")
    if new_name in configs:
        raise DeltatuneError(f"combine_adapters: adapter {new_name!r} already exists; pick another new_name")
    for name in names:
        if name not in configs:
            raise DeltatuneError(f"combine_adapters: no adapter named {name!r} on this model "
                                 f"(loaded: {', '.join(configs) or 'none'})")
        config = configs[name]
        if not isinstance(config, LoraConfig):
            raise DeltatuneError(f"combine_adapters: adapter {name!r} is a {config.method} delta; "
                                 f"only LoRA adapters can be combined")
        if config.use_dora:  # m·(W+ΔW)/‖W+ΔW‖ is not linear in ΔW: no sum of factors reproduces it
            raise DeltatuneError(f"combine_adapters: adapter {name!r} is a DoRA delta; its per-row "
                                 f"magnitudes do not combine linearly — merge it instead")
        if config.modules_to_save:
            raise DeltatuneError(f"combine_adapters: adapter {name!r} also trains whole modules "
                                 f"({', '.join(config.modules_to_save)}), which have no low-rank "
                                 f"form to combine")
    chosen = [configs[n] for n in names]
    if how == "linear" and len({c.r for c in chosen}) > 1:
        raise DeltatuneError(f"combine_adapters: how='linear' needs equal ranks, got "
                             f"{', '.join(f'{n}: r={c.r}' for n, c in zip(names, chosen))} "
                             f"(use how='cat' or 'svd')")
    return chosen


def _pieces(layer: LoraLayer, names: Sequence[str], ranks: Sequence[int], dtype: torch.dtype):
    """(A_i, B_i, scale_i) of each adapter on this layer as (r, in) / (out, r); zeros if absent."""
    weight = layer.base_layer.weight
    in_f, out_f = in_out_features(layer.base_layer)  # (a 4-bit weight's shape is its packed one)
    pieces = []
    for name, r in zip(names, ranks):
        if name in layer.deltas:
            d = layer.deltas[name]
            pieces.append((d.lora_A.weight.to(dtype), d.lora_B.weight.to(dtype), d.scale))
        else:  # this adapter leaves the layer alone: a zero update of its rank
            zeros = dict(dtype=dtype, device=weight.device)
            pieces.append((torch.zeros(r, in_f, **zeros), torch.zeros(out_f, r, **zeros), 1.0))
    return pieces


def _linear(pieces, weights) -> tuple[torch.Tensor, torch.Tensor]:
    lora_A = sum(math.sqrt(abs(w) * s) * A for (A, _, s), w in zip(pieces, weights))
    lora_B = sum(math.copysign(math.sqrt(abs(w) * s), w) * B for (_, B, s), w in zip(pieces, weights))
    return lora_A, lora_B


def _cat(pieces, weights) -> tuple[torch.Tensor, torch.Tensor]:
    lora_A = torch.cat([A for A, _, _ in pieces], dim=0)                          # (Σr, in)
    lora_B = torch.cat([w * s * B for (_, B, s), w in zip(pieces, weights)], dim=1)  # (out, Σr)
    return lora_A, lora_B


def _svd(pieces, weights, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    delta = sum(w * s * (B @ A) for (A, B, s), w in zip(pieces, weights))  # (out, in)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, S.shape[0])
    root = S[:k].sqrt()
    lora_B = delta.new_zeros(delta.shape[0], rank)  # ranks beyond the sum's own rank stay zero
    lora_A = delta.new_zeros(rank, delta.shape[1])
    lora_B[:, :k] = U[:, :k] * root          # (out, k): split √S between the two factors
    lora_A[:k] = root[:, None] * Vh[:k]      # (k, in)
    return lora_A, lora_B


def combine_adapters(model: nn.Module, names: Sequence[str], weights: Sequence[float],
                     how: str = "linear", new_name: str = "combined",
                     rank: int | None = None) -> nn.Module:
    """Add LoRA adapter `new_name` = a weighted combination of adapters `names` (see module doc).

    linear: weighted sum of the A and B matrices (with √weights and scales folded in); needs
    equal ranks, and for several adapters it is not the weighted sum of their deltas ΔW_i
    (B·A picks up cross terms B_i·A_j). cat: exactly Σ w_i·ΔW_i at rank Σ r_i. svd: truncated SVD
    of Σ w_i·ΔW_i at `rank` (default max r_i). The previously active adapter stays active; use
    set_adapter(model, new_name) to run the new one, save_adapter(model, dir, new_name) to keep it.
    """
    chosen = _check(model, names, weights, how, new_name)
    weights = [float(w) for w in weights]
    ranks = [c.r for c in chosen]
    new_rank = {"linear": ranks[0], "cat": sum(ranks), "svd": rank if rank is not None else max(ranks)}[how]
    if not isinstance(new_rank, int) or isinstance(new_rank, bool) or new_rank <= 0:
        raise DeltatuneError(f"combine_adapters: rank must be a positive integer, got {rank!r}")
    layers = [l for l in lora_layers(model) if any(n in l.deltas for n in names)]
    paths = {id(l): p for p, l in model.named_modules() if isinstance(l, LoraLayer)}
    state = delta_state(model)
    previous = state.active
    targets = "^(" + "|".join(re.escape(paths[id(l)]) for l in layers) + ")$"
    config = LoraConfig(r=new_rank, alpha=new_rank, target_modules=targets, modules_to_save=[])
    with torch.no_grad():
        factors = []
        for layer in layers:
            # Combine in float64 so that cat/svd are exact up to the final rounding.
            pieces = _pieces(layer, names, ranks, torch.float64)
            if how == "linear":
                factors.append(_linear(pieces, weights))
            elif how == "cat":
                factors.append(_cat(pieces, weights))
            else:
                factors.append(_svd(pieces, weights, new_rank))
        apply(model, config, new_name)
        for layer, (lora_A, lora_B) in zip(layers, factors):
            delta = layer.deltas[new_name]
            delta.lora_A.weight.copy_(lora_A.to(delta.lora_A.weight.dtype))
            delta.lora_B.weight.copy_(lora_B.to(delta.lora_B.weight.dtype))
    if previous is not None:
        set_adapter(model, previous)
    return model
