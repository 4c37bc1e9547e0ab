"""What OFT, BOFT, LoHa and LoKr share: a linear layer whose weight each delta transforms.

Each of these methods computes, from its few trained tensors, something the size of the layer's
weight (an orthogonal matrix that multiplies it, or a dense update added to it), so each delta
module implements three things and `WeightLayer` does the rest (switching, merging, mixed rows):

    output(base_layer, x, transposed)   the adapted layer's output for input x
    merge_into(weight, transposed)      W <- the adapted weight, in place
    unmerge_from(weight, transposed)    undo merge_into exactly (an inverse, not a saved copy)

Works on nn.Linear and GPT-2's Conv1D (weight stored transposed, (in, out)); `transposed` says
which. Targets follow LoRA's rules: names matched on the last path components, a regex fully
matching the path, or "all-linear" (every linear layer inside the transformer layers).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from deltatune.errors import DeltatuneError
from deltatune.methods.base import merge_functions, DeltaLayer, MethodConfig, delta_layers, module_names_hint, set_parent
from deltatune.methods.lora import in_out_features, short_targets
from deltatune.methods.lora_rows import row_groups


@dataclass
class TargetedConfig(MethodConfig):
    """target_modules / exclude_modules, as LoraConfig has them (PEFT's names)."""

    # names (last path components), a regex (full match on the path), or "all-linear" (every
    # linear layer inside the transformer layers, never the head), as LoRA's default
    target_modules: list[str] | str = "all-linear"
    exclude_modules: list[str] | str | None = None

    def validate(self) -> None:
        super().validate()
        for field_name in ("target_modules", "exclude_modules"):
            value = getattr(self, field_name)
            if value is None and field_name == "exclude_modules":
                continue
            if isinstance(value, str):
                if value == "all-linear" and field_name == "target_modules":
                    continue
                try:
                    re.compile(value)
                except re.error as exc:
                    self.fail(field_name, f"is not a valid regex ({exc})")
            elif not (isinstance(value, list) and (value or field_name == "exclude_modules")
                      and all(isinstance(t, str) for t in value)):
                self.fail(field_name, f"must be a non-empty list of names, a regex or 'all-linear', "
                                      f"got {value!r}")

    def check_dropout(self, field_name: str) -> None:
        value = getattr(self, field_name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            self.fail(field_name, f"must be a number in [0, 1), got {value!r}")

    def check_flag(self, field_name: str) -> None:
        if not isinstance(getattr(self, field_name), bool):
            self.fail(field_name, f"must be true or false, got {getattr(self, field_name)!r}")

    def check_positive_int(self, field_name: str, allow_zero: bool = False) -> None:
        value = getattr(self, field_name)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
            what = "a non-negative" if allow_zero else "a positive"
            self.fail(field_name, f"must be {what} integer, got {value!r}")


# ------------------------------------------------------------------ the layer
def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class WeightLayer(DeltaLayer):
    """A linear layer with named weight-transforming deltas; `merged` names the one folded in."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.merged: str | None = None
        self.transposed = is_conv1d(base_layer)
        self.row_adapters: tuple[str | None, ...] | None = None  # see deltatune.mixed

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None:
            return self._mixed_forward(x, *args, **kwargs)
        delta = self.active_delta()
        if delta is None or self.merged == self.active:
            return self.base_layer(x, *args, **kwargs)
        return delta.output(self.base_layer, x, self.transposed, *args, **kwargs)

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row through its own adapter (or the base): every one of these deltas is a
        function of the row's own input, so rows are computed group by group and put back."""
        groups = [(name, rows) for name, rows in row_groups(self.row_adapters, x.shape[0], x.device)
                  if name in self.deltas]
        if not groups:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs).clone()
        for name, rows in groups:
            out = self.deltas[name].output(self.base_layer, x.index_select(0, rows), self.transposed,
                                           *args, **kwargs)
            result.index_copy_(0, rows, out.to(result.dtype))
        return result

    def merge(self) -> None:
        if self.active is None or self.merged is not None:
            return
        with torch.no_grad():
            self.deltas[self.active].merge_into(self.base_layer.weight, self.transposed)
        self.merged = self.active

    def unmerge(self) -> None:
        if self.merged is None:
            return
        with torch.no_grad():
            self.deltas[self.merged].unmerge_from(self.base_layer.weight, self.transposed)
        self.merged = None


def weight_out_in(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A stored weight as (out, in), whichever way the layer keeps it."""
    return weight.T if transposed else weight


def add_to_weight(weight: torch.Tensor, update_out_in: torch.Tensor, transposed: bool, sign: float = 1.0) -> None:
    """weight += sign * update, the update given as (out, in)."""
    update = update_out_in.T if transposed else update_out_in
    weight.data.add_(update.to(weight.dtype), alpha=sign)


class AdditiveDelta(nn.Module):
    """A delta that adds a dense update ΔW (out, in), rebuilt from its factors every forward
    (LoHa, LoKr). In training, `module_dropout` skips the whole update for a step and
    `rank_dropout` zeroes random output rows of ΔW (rescaled to keep its mean when `rescale`)."""

    module_dropout: float = 0.0
    rank_dropout: float = 0.0
    rescale_rank_dropout: bool = True

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def output(self, base_layer: nn.Module, x: torch.Tensor, transposed: bool, *args, **kwargs) -> torch.Tensor:
        out = base_layer(x, *args, **kwargs)
        if self.training and self.module_dropout and float(torch.rand(1)) <= self.module_dropout:
            return out
        update = self.delta_weight()
        if self.training and self.rank_dropout:
            keep = (torch.rand(update.shape[0], device=update.device) > self.rank_dropout).to(update.dtype)
            if self.rescale_rank_dropout:
                keep = keep / keep.mean().clamp_min(1e-12)
            update = update * keep.view(-1, 1)
        return out + F.linear(x.to(update.dtype), update).to(out.dtype)

    def merge_into(self, weight: torch.Tensor, transposed: bool) -> None:
        add_to_weight(weight, self.delta_weight().float(), transposed)

    def unmerge_from(self, weight: torch.Tensor, transposed: bool) -> None:
        add_to_weight(weight, self.delta_weight().float(), transposed, sign=-1.0)


# ------------------------------------------------------------------ targets, apply, merge
def _named(path: str, names: list[str] | str) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(path == t or path.endswith("." + t) for t in names)


def _inside_layers(path: str, model: nn.Module) -> bool:
    from deltatune.models import architecture_of

    return any(path.startswith(p + ".") for p in architecture_of(model).layers)


def find_targets(model: nn.Module, config: TargetedConfig) -> list[str]:
    """Paths of the linear layers the config names (or already wrapped, for a second adapter).
    A layer that carries another method's delta cannot take one of these as well."""
    targets, exclude = config.target_modules, config.exclude_modules
    config_name = type(config).__name__
    paths = []
    for path, module in model.named_modules():
        if ".deltas." in path or path.endswith(".base_layer"):
            continue
        chosen = _inside_layers(path, model) if targets == "all-linear" else _named(path, targets)
        if not chosen or (exclude and _named(path, exclude)):
            continue
        if isinstance(module, DeltaLayer) and not isinstance(module, WeightLayer):
            raise DeltatuneError(f"{config_name}.target_modules: {path} already carries another method's "
                                 f"delta ({type(module).__name__}); one layer takes deltas of one kind")
        if isinstance(module, (nn.Linear, WeightLayer)) or is_conv1d(module):
            paths.append(path)
    if not paths:
        raise DeltatuneError(f"{config_name}.target_modules: {targets!r} matched no linear module "
                             f"(some that exist: {module_names_hint(model)})")
    return paths


def apply_weight_deltas(model: nn.Module, config: TargetedConfig, name: str,
                        make_delta: Callable[[str, int, int, torch.Tensor], nn.Module]) -> None:
    """Wrap every target in a WeightLayer and give it `make_delta(path, in, out, weight)`.
    Every delta is built (and checked) before any layer is changed: a width one method cannot
    use leaves the model as it was."""
    built = []
    for path in find_targets(model, config):
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, WeightLayer) else module
        in_f, out_f = in_out_features(base)
        delta = make_delta(path, in_f, out_f, base.weight).to(base.weight.device)
        if base.weight.dtype == torch.float64:
            delta = delta.double()
        built.append((path, module, delta))
    for path, module, delta in built:
        if not isinstance(module, WeightLayer):
            module = WeightLayer(module)
            set_parent(model, path, module)
        module.add_delta(name, delta)


def weight_layers(model: nn.Module) -> list[WeightLayer]:
    return [layer for _, layer in delta_layers(model) if isinstance(layer, WeightLayer)]


merge_weight_layers, unmerge_weight_layers = merge_functions(WeightLayer)


def peft_targets(config: TargetedConfig, model: nn.Module, name: str) -> dict:
    """target_modules / exclude_modules as PEFT reads them, selecting exactly what we wrapped."""
    targets, exclude = config.target_modules, config.exclude_modules
    if isinstance(targets, str):
        paths = sorted(p for p, l in delta_layers(model) if isinstance(l, WeightLayer) and name in l.deltas)
        if targets == "all-linear":
            targets, exclude = short_targets(model, paths)
        else:
            targets = "^(" + "|".join(re.escape(p) for p in paths) + ")$"
    return {"target_modules": targets, "exclude_modules": exclude,
            "fan_in_fan_out": any(l.transposed for l in weight_layers(model)),
            "layers_to_transform": None, "layers_pattern": None, "bias": "none"}


def targets_from_peft(values: dict) -> dict:
    """target_modules / exclude_modules / modules_to_save of an adapter_config.json; options
    deltatune does not implement are refused by name rather than ignored."""
    if values.get("layers_to_transform") is not None or values.get("layers_pattern"):
        raise DeltatuneError("adapter_config.json: layers_to_transform/layers_pattern are not supported "
                             "(name the layers in target_modules)")
    if values.get("bias", "none") != "none":
        raise DeltatuneError(f"adapter_config.json: bias {values['bias']!r} is not supported (only 'none')")
    if values.get("rank_pattern") or values.get("alpha_pattern"):
        raise DeltatuneError("adapter_config.json: per-module rank_pattern/alpha_pattern is not supported")

    def as_list(value):
        return list(value) if isinstance(value, (set, tuple)) else value

    targets = as_list(values.get("target_modules"))
    if targets is None:
        raise DeltatuneError("adapter_config.json: target_modules is missing (deltatune needs the "
                             "layer names; PEFT's per-architecture defaults are not guessed)")
    return {"target_modules": targets, "exclude_modules": as_list(values.get("exclude_modules")) or None,
            "modules_to_save": values.get("modules_to_save")}


def nearest_divisors(width: int, wanted: int) -> str:
    """The divisors of `width` nearest `wanted`, for error messages."""
    divisors = [d for d in range(1, width + 1) if width % d == 0]
    below = max((d for d in divisors if d <= wanted), default=None)
    above = min((d for d in divisors if d >= wanted), default=None)
    return " or ".join(str(d) for d in dict.fromkeys(x for x in (below, above) if x is not None))
