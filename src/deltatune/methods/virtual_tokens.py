"""The ONE place that puts virtual tokens into a transformers model (prompt tuning, P-tuning, prefix).

Two kinds of virtual tokens, both owned by one model-level `VirtualTokenController`
(registered as `model.deltatune_virtual_tokens`, so its parameters train and switch like any delta):

* "input" tokens (prompt tuning, P-tuning): n embeddings inserted into `inputs_embeds` by a forward
  pre-hook on the model. Decoders get them in front of the sequence; encoders right after
  position 0, so BERT's pooler still reads [CLS]. The attention mask, token types, labels (-100)
  and position ids are extended to match; the outputs' logits/hidden states are cut back to the
  real positions so callers see the shapes they passed in. With a KV cache the tokens enter in the
  prefill only (they then live in the cache); later steps only extend the mask by n.
* "prefix" tokens (prefix tuning / P-tuning v2): per-layer key/value prefixes prepended *inside
  every self-attention call*, after the cache update and RoPE. The model is routed through an
  attention implementation registered here ("deltatune_prefix_sdpa" / "_eager") that concatenates
  the prefix to keys/values and opens n always-visible mask columns, then calls the real sdpa or
  eager kernel. The cache never holds the prefix, so cached and uncached decoding see the same
  keys, encoders need no `past_key_values`, and grouped-query attention works (the prefixes have
  kv_heads heads).

Positions: on decoders the virtual tokens occupy positions 0..n-1 and real tokens follow from n,
counted from the first non-padding token (as PEFT does, so its adapters give the same logits).
Encoders keep their own position ids (prompt tokens simply take positions 1..n after [CLS]).
"""
from __future__ import annotations

import functools
import inspect
import sys
import weakref
from typing import Any

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.base import delta_state
from deltatune.models import architecture_of
from deltatune.methods.prefix_attention import (PREFIX_ATTENTION, attention_geometry,
                                                register_prefix_attention, self_attention_modules)

CONTROLLER_ATTR = "deltatune_virtual_tokens"


class VirtualTokens(nn.Module):
    """n virtual tokens of one adapter: a trainable table, optionally reparameterised by `encoder`.

    `prompt_embeddings` is PEFT's name for the saved tensor. kind "input": the output is (n, hidden);
    kind "prefix": (n, layers·2·kv_heads·head_dim), PEFT's flat key/value layout. With an encoder
    (P-tuning's LSTM/MLP, prefix tuning's projection) the table is the encoder's input; `fold`
    returns the encoder's output, which is what is saved, so inference needs no encoder.
    """

    def __init__(self, kind: str, prompt_embeddings: torch.Tensor, encoder: nn.Module | None = None):
        super().__init__()
        self.kind = kind
        self.num_virtual_tokens = prompt_embeddings.shape[0]
        self.prompt_embeddings = nn.Parameter(prompt_embeddings)
        self.encoder = encoder

    def forward(self) -> torch.Tensor:
        if self.encoder is None:
            return self.prompt_embeddings
        return self.encoder(self.prompt_embeddings)

    def fold(self) -> torch.Tensor:
        with torch.no_grad():
            return self().detach().clone()

    def load_folded(self, values: torch.Tensor) -> None:
        """Become the plain (already encoded) tokens `values`; the encoder, if any, is dropped."""
        if self.encoder is None:  # same Parameter object: an optimizer holding it stays valid
            with torch.no_grad():
                self.prompt_embeddings.copy_(values.to(self.prompt_embeddings.dtype))
            return
        trainable = self.prompt_embeddings.requires_grad
        self.encoder = None
        self.prompt_embeddings = nn.Parameter(values.to(self.prompt_embeddings), requires_grad=trainable)

    def reparameterisation(self) -> dict[str, torch.Tensor]:
        """Table + encoder weights (empty without an encoder): what continuing training needs."""
        if self.encoder is None:
            return {}
        return {name: tensor.detach() for name, tensor in self.state_dict().items()}


# ------------------------------------------------------------------ the controller
@functools.cache
def _forward_parameters(model_class: type) -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(model_class.forward).parameters if p != "self")


def _cache_length(cache: Any) -> int:
    return int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0


class VirtualTokenController(nn.Module):
    """Holds every prompt-method adapter of one model and inserts the active one's tokens."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.sources = nn.ModuleDict()
        self.active: str | None = None
        self.is_decoder = architecture_of(model).is_decoder
        # Decoder classifiers pool the last non-pad token, found from input_ids; with prompts
        # the model gets inputs_embeds instead and pools the last position (see _pad_left).
        self.pools_last_token = type(model).__name__.endswith("ForSequenceClassification")
        self.geometry = attention_geometry(model)
        self._state = delta_state(model)
        self._model = weakref.ref(model)  # not a submodule: the model owns this controller
        self._handles: list = []
        self._routed_from: str | None = None  # attention implementation before prefix routing
        self._prefix_cache: torch.Tensor | None = None   # this forward's per-layer prefixes
        self._strip: tuple[int, int] | None = None       # (n, real length) to cut from outputs

    # -- adapters ----------------------------------------------------------------------------
    def deltatune_set_active(self, name: str | None) -> None:
        self.active = name if name in self.sources else None
        for adapter, source in self.sources.items():
            for param in source.parameters():
                param.requires_grad_(adapter == name)

    def deltatune_delete(self, name: str) -> None:
        if name in self.sources:
            del self.sources[name]
        if self.active == name:
            self.active = None
        # Once no prompt adapter is left the model runs exactly as before: no hooks, no routing.
        # (The empty controller stays registered: delete runs while iterating model.modules().)
        if not any(s.kind == "prefix" for s in self.sources.values()):
            self.unroute_prefix_attention()
        if len(self.sources) == 0:
            self.remove_hooks()

    def install_hooks(self) -> None:
        if self._handles:
            return
        model = self._model()
        self._handles = [model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                         model.register_forward_hook(self._after_forward, with_kwargs=True)]

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- prefix routing ------------------------------------------------------------------------
    def route_prefix_attention(self) -> None:
        if self._routed_from is not None:
            return
        model = self._model()
        implementation = model.config._attn_implementation or "eager"
        if implementation not in PREFIX_ATTENTION:
            raise DeltatuneError(
                f"prefix tuning supports the sdpa and eager attention implementations; this model "
                f"uses {implementation!r} (load it with attn_implementation='sdpa')")
        modules = self_attention_modules(model)
        for index, module in enumerate(modules):
            source = sys.modules[type(module).__module__]
            if not hasattr(source, "ALL_ATTENTION_FUNCTIONS") or (
                    implementation == "eager" and not hasattr(source, "eager_attention_forward")):
                raise DeltatuneError(
                    f"prefix tuning: {type(module).__name__} does not dispatch through transformers' "
                    "AttentionInterface, so no prefix can be injected into it")
            module.deltatune_prefix = functools.partial(self.layer_prefix, index)
        register_prefix_attention()
        model.config._attn_implementation = PREFIX_ATTENTION[implementation]
        self._routed_from = implementation

    def unroute_prefix_attention(self) -> None:
        if self._routed_from is None:
            return
        model = self._model()
        for module in self_attention_modules(model):
            if hasattr(module, "deltatune_prefix"):
                del module.deltatune_prefix
        model.config._attn_implementation = self._routed_from
        self._routed_from = None

    def layer_prefix(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._prefix_cache is None:
            return None
        return self._prefix_cache[2 * layer_index], self._prefix_cache[2 * layer_index + 1]

    def _build_prefixes(self, source: VirtualTokens) -> torch.Tensor:
        # Built once per model forward, before any layer runs: outside gradient-checkpointed
        # regions, so a layer's recomputation replays exactly the ops of its first run.
        g = self.geometry
        flat = source()  # (n, layers * 2 * kv_heads * head_dim), PEFT's order
        return flat.view(source.num_virtual_tokens, g["layers"] * 2, g["kv_heads"],
                         g["head_dim"]).permute(1, 2, 0, 3)  # (2·layers, kv_heads, n, head_dim)

    # -- hooks ------------------------------------------------------------------------------------
    def _active_source(self) -> VirtualTokens | None:
        if self._state.disabled or self.active is None or self.active not in self.sources:
            return None
        return self.sources[self.active]

    def _before_forward(self, model: nn.Module, args: tuple, kwargs: dict):
        source = self._active_source()
        self._prefix_cache, self._strip = None, None
        if source is None:
            return None
        if source.kind == "prefix":
            self._prefix_cache = self._build_prefixes(source)
        names = _forward_parameters(type(model))
        kwargs = {**dict(zip(names, args)), **kwargs}
        if self.is_decoder:
            if source.kind == "input" and self.pools_last_token:
                self._pad_left(kwargs)
            self._prepare_decoder(model, source, kwargs)
        elif source.kind == "input":
            self._prepare_encoder(model, source, kwargs)
        return (), kwargs

    def _check_length(self, total: int, real: int) -> None:
        limit = self.geometry["max_positions"]
        if limit and total > limit:
            raise DeltatuneError(
                f"input of {real} tokens + {total - real} virtual tokens needs {total} positions but "
                f"the model has max_position_embeddings={limit}; shorten the input (data.max_length) "
                "or lower num_virtual_tokens")

    @staticmethod
    def _pad_left(kwargs: dict) -> None:
        """Move each row's trailing padding to its front, so the last position is a real token."""
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2 or bool(mask[:, -1].all()):
            return
        length = mask.shape[1]
        columns = torch.arange(length, device=mask.device)
        last_real = (mask.long() * (columns + 1)).argmax(1)  # (batch,) each row's last real token
        trailing = length - 1 - last_real                      # pads after it: roll right by that
        index = (columns - trailing[:, None]) % length         # (batch, seq)
        for key in ("input_ids", "inputs_embeds", "attention_mask", "token_type_ids", "position_ids"):
            value = kwargs.get(key)
            if value is not None and value.dim() >= 2 and value.shape[:2] == mask.shape:
                gather = index.view(*index.shape, *[1] * (value.dim() - 2)).expand_as(value)
                kwargs[key] = value.gather(1, gather)

    def _prepare_decoder(self, model: nn.Module, source: VirtualTokens, kwargs: dict) -> None:
        n = source.num_virtual_tokens
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        batch, length = (embeds if embeds is not None else ids).shape[:2]
        device = (embeds if embeds is not None else ids).device
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = _cache_length(cache)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise DeltatuneError("prompt methods need a 2D attention_mask (batch, sequence), "
                                 f"got shape {tuple(mask.shape)}")
        # "input" tokens live in the cache after the prefill; "prefix" tokens never do.
        in_cache = n if (source.kind == "input" and past > 0) else 0
        real_past = past - in_cache
        positions = kwargs.get("position_ids")
        if positions is None:
            if mask is not None:  # count from the first real token, so left padding is harmless
                positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            else:
                positions = torch.arange(real_past, real_past + length, device=device).expand(batch, -1)
        elif source.kind == "input" and mask is None and length > 1 and bool(
                (positions[..., 1:] < positions[..., :-1]).any()):
            raise DeltatuneError("prompt tuning / P-tuning cannot run on packed sequences (position_ids "
                                 "restart inside a row); set data.packing: false")
        real_length = mask.shape[1] if mask is not None else real_past + length
        self._check_length(n + real_length, real_length)
        kwargs["position_ids"] = positions + n
        if source.kind != "input":
            return
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if past > 0:
            return
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)
        prompts = source().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (batch, n, hidden)
        kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
        kwargs["input_ids"] = None
        virtual_positions = torch.arange(n, device=device).expand(positions.shape[0], -1)
        kwargs["position_ids"] = torch.cat([virtual_positions, kwargs["position_ids"]], dim=1)
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() == 2:  # the loss never looks at virtual positions
            kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], n), -100), labels], dim=1)
        self._strip = (n, length)

    def _prepare_encoder(self, model: nn.Module, source: VirtualTokens, kwargs: dict) -> None:
        """Insert the prompt after position 0 so [CLS]-pooling classifiers read a real token."""
        n = source.num_virtual_tokens
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)
        batch, length = embeds.shape[:2]
        self._check_length(n + length, length)
        prompts = source().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (batch, n, hidden)
        kwargs["inputs_embeds"] = torch.cat([embeds[:, :1], prompts, embeds[:, 1:]], dim=1)
        kwargs["input_ids"] = None

        def insert(tensor: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
            return torch.cat([tensor[:, :1], fill, tensor[:, 1:]], dim=1)

        for key, fill in (("attention_mask", 1), ("token_type_ids", 0)):
            if kwargs.get(key) is not None:
                kwargs[key] = insert(kwargs[key], kwargs[key].new_full((batch, n), fill))
        if kwargs.get("position_ids") is not None:
            positions = kwargs["position_ids"].expand(batch, -1)
            virtual = positions[:, :1] + 1 + torch.arange(n, device=positions.device)
            kwargs["position_ids"] = torch.cat([positions[:, :1], virtual, positions[:, 1:] + n], dim=1)
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() == 2 and labels.shape[1] == length:  # token labels
            kwargs["labels"] = insert(labels, labels.new_full((batch, n), -100))
        self._strip = (n, length)

    def _after_forward(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Cut the virtual positions out of per-token outputs: callers get back their own length."""
        if self._strip is None or not hasattr(output, "keys"):
            return output
        n, length = self._strip
        self._strip = None

        def cut(tensor: Any) -> Any:
            if not isinstance(tensor, torch.Tensor) or tensor.dim() < 3 or tensor.shape[1] != n + length:
                return tensor
            if self.is_decoder:
                return tensor[:, n:]
            return torch.cat([tensor[:, :1], tensor[:, 1 + n:]], dim=1)

        for key in ("logits", "last_hidden_state"):
            if output.get(key) is not None:
                output[key] = cut(output[key])
        if output.get("hidden_states") is not None:
            output["hidden_states"] = tuple(cut(h) for h in output["hidden_states"])
        return output


# ------------------------------------------------------------------ what the methods call
def controller_of(model: nn.Module, create: bool = False) -> VirtualTokenController | None:
    controller = getattr(model, CONTROLLER_ATTR, None)
    if controller is None and create:
        controller = VirtualTokenController(model)
        model.add_module(CONTROLLER_ATTR, controller)
    return controller


def attach(model: nn.Module, name: str, source: VirtualTokens) -> None:
    """Add `source` as adapter `name` (deltas.apply then makes it active and trainable)."""
    architecture_of(model)  # one clear line for an unsupported model type
    controller = controller_of(model, create=True)
    controller.install_hooks()
    if source.kind == "prefix":
        controller.route_prefix_attention()
    weight = model.get_input_embeddings().weight
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    controller.sources[name] = source.to(device=weight.device, dtype=dtype)


def source_of(model: nn.Module, name: str) -> VirtualTokens:
    controller = controller_of(model)
    if controller is None or name not in controller.sources:
        raise DeltatuneError(f"no prompt-method adapter named {name!r} on this model")
    return controller.sources[name]
