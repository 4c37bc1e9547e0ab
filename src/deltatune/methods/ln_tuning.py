"""LayerNorm tuning (Zhao et al. 2024, "Tuning LayerNorm in Attention"): only the normalisation
layers train — their weights (gains) and, where they have them, biases.

Each targeted norm gets a trainable copy that replaces it while the adapter is active (PEFT's
`ln_tuning_layers`): a fresh adapter is the base exactly. A few thousand parameters per model
(two vectors of the hidden size per layer, one for RMSNorm). Merging swaps the tuned copy in
for the base norm (and back), as PEFT does; there is no arithmetic to fold.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.base import (merge_functions, DeltaLayer, MethodConfig, check_module_names,
                                    delta_layers, module_names_hint, set_parent)
from deltatune.methods.lora import _named, short_targets
from deltatune.methods.row_updates import mixed_rows


@dataclass
class LNTuningConfig(MethodConfig):
    method = "ln-tuning"
    peft_type = "LN_TUNING"

    # module names (last path components) or a regex (full match on the path). None: every
    # normalisation layer of the model (LayerNorm, RMSNorm, ...) — PEFT's defaults where PEFT
    # has them (Llama: input_layernorm, post_attention_layernorm, norm; GPT-2: ln_1, ln_2, ln_f)
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None

    def validate(self) -> None:
        super().validate()
        check_module_names(self, "target_modules")
        check_module_names(self, "exclude_modules")


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and the families' own norm classes (LlamaRMSNorm, T5LayerNorm, ...)."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("Norm")


class LNTuningCopy(nn.Module):
    """The trainable copy of one norm, under PEFT's attribute name (keys `<path>.ln_tuning_layers.*`)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.ln_tuning_layers = copy.deepcopy(norm)
        for param in self.ln_tuning_layers.parameters():
            param.requires_grad_(True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.ln_tuning_layers(*args, **kwargs)


class LNTuningLayer(DeltaLayer):
    """A norm with named tuned copies; the active one runs instead of the base norm."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.merged: str | None = None
        self.row_adapters: tuple[str | None, ...] | None = None  # see deltatune.mixed

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.row_adapters is not None:  # a norm acts on each token alone: rows can differ
            out = self.base_layer(*args, **kwargs)
            return mixed_rows(self, args[0], out, lambda delta, rows_x, rows_out: delta(rows_x, *args[1:], **kwargs))
        delta = self.active_delta()
        if delta is None or self.merged == self.active:
            return self.base_layer(*args, **kwargs)
        return delta(*args, **kwargs)

    def merge(self) -> None:
        """Swap the tuned norm in as the base (the base waits in its place until unmerge)."""
        if self.active is None or self.merged is not None:
            return
        delta = self.deltas[self.active]
        self.base_layer, delta.ln_tuning_layers = delta.ln_tuning_layers, self.base_layer
        self.merged = self.active

    def unmerge(self) -> None:
        if self.merged is None:
            return
        delta = self.deltas[self.merged]
        self.base_layer, delta.ln_tuning_layers = delta.ln_tuning_layers, self.base_layer
        self.merged = None


def find_norms(model: nn.Module, config: LNTuningConfig) -> list[str]:
    paths = []
    for path, module in model.named_modules():
        if not path or ".deltas." in path or path.endswith(".base_layer"):
            continue
        if config.exclude_modules and _named(path, config.exclude_modules):
            continue
        chosen = (_named(path, config.target_modules) if config.target_modules is not None
                  else is_norm(module) or isinstance(module, LNTuningLayer))
        if not chosen:
            continue
        if isinstance(module, DeltaLayer) and not isinstance(module, LNTuningLayer):
            raise DeltatuneError(f"LNTuningConfig.target_modules: {path} already carries another method's "
                                 f"delta ({type(module).__name__}); LN tuning cannot share a layer with it")
        base = module.base_layer if isinstance(module, LNTuningLayer) else module
        if not any(True for _ in base.parameters()):
            continue  # a norm without learnable parameters has nothing to tune
        paths.append(path)
    return paths


def apply_ln_tuning(model: nn.Module, config: LNTuningConfig, name: str) -> None:
    paths = find_norms(model, config)
    if not paths:
        what = repr(config.target_modules) if config.target_modules is not None else "the default (every norm)"
        raise DeltatuneError(f"LNTuningConfig.target_modules: {what} matched no normalisation layer "
                             f"with parameters (some modules that exist: {module_names_hint(model)})")
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, LNTuningLayer):
            module = LNTuningLayer(module)
            set_parent(model, path, module)
        module.add_delta(name, LNTuningCopy(module.base_layer))


def ln_tuning_layers(model: nn.Module) -> list[LNTuningLayer]:
    return [layer for _, layer in delta_layers(model) if isinstance(layer, LNTuningLayer)]


merge_ln_tuning, unmerge_ln_tuning = merge_functions(LNTuningLayer)


def ln_tuning_to_peft(config: LNTuningConfig, model: nn.Module, name: str) -> dict:
    targets, exclude = config.target_modules, config.exclude_modules
    if targets is None:  # the exact set wrapped, as short names plus the exceptions
        paths = sorted(p for p, l in delta_layers(model) if isinstance(l, LNTuningLayer) and name in l.deltas)
        targets, exclude = short_targets(model, paths)
    return {"target_modules": targets, "exclude_modules": exclude}


def ln_tuning_from_peft(values: dict) -> LNTuningConfig:
    def as_list(value):
        return list(value) if isinstance(value, (set, tuple)) else value

    return LNTuningConfig(target_modules=as_list(values.get("target_modules")),
                          exclude_modules=as_list(values.get("exclude_modules")) or None,
                          modules_to_save=values.get("modules_to_save"))


from deltatune.methods import Method  # noqa: E402  (the registry imports this module)

METHOD = Method(name="ln-tuning", config=LNTuningConfig, apply=apply_ln_tuning,
                to_peft=ln_tuning_to_peft, from_peft=ln_tuning_from_peft,
                merge=merge_ln_tuning, unmerge=unmerge_ln_tuning,
                default_lr=1e-3)
