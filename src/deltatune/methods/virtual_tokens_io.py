"""Save and load prompt-method adapters in PEFT's layout: one `prompt_embeddings` tensor.

Shared by prompt tuning, P-tuning and prefix tuning; the virtual tokens themselves are put into
the model by `virtual_tokens`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.base import PEFT_PREFIX, MethodConfig, peft_key_map
from deltatune.methods.prefix_attention import attention_geometry
from deltatune.methods.virtual_tokens import source_of

PROMPT_KEY = "prompt_embeddings"
# PEFT keeps a prompt method's base model one level higher than LoRA's: base_model.<path>.
PROMPT_PEFT_PREFIX = "base_model."


def _saved_module_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """modules_to_save (e.g. the classifier) under PEFT's keys for prompt methods."""
    return {PROMPT_PEFT_PREFIX + key[len(PEFT_PREFIX):]: tensor
            for key, tensor in peft_key_map(model, name).items()}


# P-tuning's encoder and prefix tuning's projection are saved beside the folded tokens so that a
# checkpoint resumes training exactly; PEFT ignores these keys, inference never needs them.
REPARAM_PREFIX = "deltatune_reparam."


def virtual_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    source = source_of(model, name)
    tensors = {PROMPT_KEY: source.fold()}
    tensors.update({REPARAM_PREFIX + k: v for k, v in source.reparameterisation().items()})
    tensors.update({k: v.detach() for k, v in _saved_module_tensors(model, name).items()})
    return tensors


def load_virtual_state_dict(model: nn.Module, name: str, tensors: dict[str, torch.Tensor],
                            source_file: str) -> None:
    source = source_of(model, name)
    if PROMPT_KEY not in tensors:
        raise DeltatuneError(f"{source_file}: tensor {PROMPT_KEY!r} is missing")
    expected = tuple(source.fold().shape)
    if tuple(tensors[PROMPT_KEY].shape) != expected:
        raise DeltatuneError(f"{source_file}: tensor {PROMPT_KEY!r} has shape "
                             f"{tuple(tensors[PROMPT_KEY].shape)} but this base model expects "
                             f"{expected} — adapter saved for another base or num_virtual_tokens?")
    live = _saved_module_tensors(model, name)
    reparam = {k[len(REPARAM_PREFIX):]: v for k, v in tensors.items() if k.startswith(REPARAM_PREFIX)}
    extra = sorted(k for k in set(tensors) - set(live) - {PROMPT_KEY}
                   if not k.startswith(REPARAM_PREFIX))
    if extra:
        raise DeltatuneError(f"{source_file}: tensor {extra[0]!r} has no place in this base model")
    for key, target in live.items():
        if key not in tensors:
            raise DeltatuneError(f"{source_file}: tensor {key!r} is missing")
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise DeltatuneError(f"{source_file}: tensor {key!r} has shape {tuple(tensors[key].shape)} "
                                 f"but this base model expects {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensors[key].to(target.dtype))
    live_reparam = source.state_dict() if source.encoder is not None else {}
    if reparam and set(reparam) == set(live_reparam) and all(
            reparam[k].shape == live_reparam[k].shape for k in reparam):
        source.load_state_dict(reparam)  # the encoder too: training continues exactly
    else:
        source.load_folded(tensors[PROMPT_KEY])


def common_peft_fields(model: nn.Module, num_virtual_tokens: int) -> dict[str, Any]:
    g = attention_geometry(model)
    return {"num_virtual_tokens": num_virtual_tokens, "token_dim": g["hidden"],
            "num_transformer_submodules": 1, "num_attention_heads": model.config.num_attention_heads,
            "num_layers": g["layers"]}


def validate_num_virtual_tokens(config: MethodConfig) -> None:
    n = config.num_virtual_tokens
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        config.fail("num_virtual_tokens", f"must be a positive integer, got {n!r}")


WHY_NO_MERGE = ("virtual tokens are extra inputs to attention, not a change to any weight, so there is "
                "nothing to fold them into; keep the adapter loaded instead")
