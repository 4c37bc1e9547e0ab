"""BitFit (Ben Zaken et al. 2022, "Simple Parameter-efficient Fine-tuning for Transformer-based
Masked Language-models"): only the bias terms train.

Every module with a bias (linear projections, LayerNorms, ...) gets a trainable offset added to
its output, which is where every bias acts:

    y = f(x) + b + Δb        Δb: (out,), starts at 0, so a fresh adapter is the base

Training Δb is training b (the same gradient); keeping it apart lets the base stay frozen, lets
adapters switch, disable and delete like every other delta, and makes the file the change alone.
Merging adds Δb to b (and unmerging subtracts it). A model without biases (Llama, Qwen, most
recent decoders) has nothing for BitFit to train: applying it says so in one line.

PEFT has no BitFit, so the file is deltatune's own: PEFT's layout (adapter_config.json +
adapter_model.safetensors, keys `base_model.model.<module path>.bias_delta`) under peft_type
`BITFIT`, as the bottleneck adapters' files are.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.base import merge_functions, DeltaLayer, MethodConfig, delta_layers, set_parent
from deltatune.methods.lora import _named
from deltatune.methods.row_updates import mixed_rows


@dataclass
class BitFitConfig(MethodConfig):
    method = "bitfit"
    peft_type = "BITFIT"  # ours: PEFT has no BitFit; same file layout

    # module names (last path components) or a regex (full match on the path) whose biases
    # train. None: every bias in the model outside the trained task head (modules_to_save).
    target_modules: list[str] | str | None = None

    def validate(self) -> None:
        super().validate()
        value = self.target_modules
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                self.fail("target_modules", f"is not a valid regex ({exc})")
        elif value is not None and not (isinstance(value, list) and value
                                        and all(isinstance(t, str) for t in value)):
            self.fail("target_modules", f"must be a non-empty list of module names, a regex or null, "
                                        f"got {value!r}")


class BiasDelta(nn.Module):
    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        dtype = torch.float64 if bias.dtype == torch.float64 else torch.float32
        self.bias_delta = nn.Parameter(torch.zeros(bias.shape, dtype=dtype, device=bias.device))


class BiasLayer(DeltaLayer):
    """A module with a bias and named bias offsets; `merged` names the offset added into it."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.merged: str | None = None
        self.row_adapters: tuple[str | None, ...] | None = None  # see deltatune.mixed

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if self.row_adapters is not None:
            return mixed_rows(self, args[0], out,
                              lambda delta, rows_x, rows_out: rows_out + delta.bias_delta.to(out.dtype))
        delta = self.active_delta()
        if delta is None or self.merged == self.active:
            return out
        return out + delta.bias_delta.to(out.dtype)

    def merge(self) -> None:
        if self.active is None or self.merged is not None:
            return
        with torch.no_grad():
            bias = self.base_layer.bias
            bias.data += self.deltas[self.active].bias_delta.to(bias.dtype)
        self.merged = self.active

    def unmerge(self) -> None:
        if self.merged is None:
            return
        with torch.no_grad():
            bias = self.base_layer.bias
            bias.data -= self.deltas[self.merged].bias_delta.to(bias.dtype)
        self.merged = None


def _has_bias(module: nn.Module) -> bool:
    bias = getattr(module, "bias", None)
    return isinstance(bias, nn.Parameter) and bias.dim() == 1


def find_biases(model: nn.Module, config: BitFitConfig) -> list[str]:
    """Modules whose own bias is added to their output; never a trained task head's."""
    heads = config.modules_to_save or []
    paths = []
    for path, module in model.named_modules():
        if not path or ".deltas." in path or path.endswith(".base_layer") or _named(path, heads):
            continue
        if any(path.startswith(h + ".") or f".{h}." in f".{path}" for h in heads):
            continue
        if config.target_modules is not None and not _named(path, config.target_modules):
            continue
        if isinstance(module, DeltaLayer) and not isinstance(module, BiasLayer):
            if config.target_modules is None:
                continue  # another method's layer: its bias stays as it is
            raise DeltatuneError(f"BitFitConfig.target_modules: {path} already carries another method's "
                                 f"delta ({type(module).__name__}); BitFit cannot share a layer with it")
        base = module.base_layer if isinstance(module, BiasLayer) else module
        if _has_bias(base) and base.bias.shape[0] == _output_width(base):
            paths.append(path)
    return paths


def _output_width(module: nn.Module) -> int | None:
    """The size of the output's last dimension, where the bias is added."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.nf
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    weight = getattr(module, "weight", None)  # other norms: one weight and bias per feature
    return weight.shape[0] if isinstance(weight, nn.Parameter) and weight.dim() == 1 else None


def apply_bitfit(model: nn.Module, config: BitFitConfig, name: str) -> None:
    paths = find_biases(model, config)
    if not paths:
        if config.target_modules is None:
            raise DeltatuneError(f"BitFitConfig: {type(model).__name__} has no bias terms to train "
                                 f"(its layers are built without biases); use ln-tuning or lora instead")
        raise DeltatuneError(f"BitFitConfig.target_modules: {config.target_modules!r} matched no "
                             f"module with a bias")
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, BiasLayer):
            module = BiasLayer(module)
            set_parent(model, path, module)
        module.add_delta(name, BiasDelta(module.base_layer.bias))


def bias_layers(model: nn.Module) -> list[BiasLayer]:
    return [layer for _, layer in delta_layers(model) if isinstance(layer, BiasLayer)]


merge_bitfit, unmerge_bitfit = merge_functions(BiasLayer)


def bitfit_to_peft(config: BitFitConfig, model: nn.Module, name: str) -> dict:
    targets = config.target_modules
    if targets is None:  # the exact set (another base's defaults could differ)
        paths = sorted(p for p, l in delta_layers(model) if isinstance(l, BiasLayer) and name in l.deltas)
        targets = "^(" + "|".join(re.escape(p) for p in paths) + ")$"
    return {"target_modules": targets}


def bitfit_from_peft(values: dict) -> BitFitConfig:
    targets = values.get("target_modules")
    return BitFitConfig(target_modules=list(targets) if isinstance(targets, (set, tuple)) else targets,
                        modules_to_save=values.get("modules_to_save"))


from deltatune.methods import Method  # noqa: E402  (the registry imports this module)

METHOD = Method(name="bitfit", config=BitFitConfig, apply=apply_bitfit, to_peft=bitfit_to_peft,
                from_peft=bitfit_from_peft, merge=merge_bitfit, unmerge=unmerge_bitfit,
                default_lr=1e-3)
