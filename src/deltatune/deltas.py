"""Operations on the deltas a model carries: apply, merge, switch, disable, delete."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods import Method, get_method
from deltatune.methods.base import (DEFAULT_ADAPTER, DeltaLayer, MethodConfig, delta_layers, delta_state,
                           disabled, freeze, resolve_modules_to_save, set_parent, set_trainable,
                           task_of, wrap_modules_to_save)
from deltatune.mixed import install_adapter_names, remove_adapter_names
from deltatune.quantization import dequantize_model, describe, is_quantized


def apply(model: nn.Module, config: MethodConfig, name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Turn `model` into a trainable model for `config`'s method; returns the same object.

    Everything the method does not train is frozen. Several PEFT deltas can live on one base
    under different names; the newest becomes the active (and only trainable) one.
    """
    if not isinstance(config, MethodConfig):
        raise DeltatuneError(f"apply: expected a method config (LoraConfig, ...), got {type(config).__name__}")
    method = get_method(config.method)
    check_adapter_name(name)
    state = delta_state(model)
    if name in state.configs:
        raise DeltatuneError(f"adapter {name!r} already exists on this model; pass another name=")
    if config.method == "full" and is_quantized(model):
        raise DeltatuneError(f"full fine-tuning cannot train a quantized base ({describe(model)}): "
                             "its weights are frozen integer codes; use a PEFT method or quantize: none")
    if config.method == "full" or any(c.method == "full" for c in state.configs.values()):
        if state.configs:
            raise DeltatuneError("full fine-tuning cannot share a model with other deltas")
        method.apply(model, config, name)
        state.configs[name] = config
        state.active = name
        install_adapter_names(model)  # adapter_names= then refuses in one line (full cannot mix)
        return model
    if state.active is not None:
        unmerge(model)
    config = dataclasses.replace(config, modules_to_save=resolve_modules_to_save(model, config, task_of(model)))
    if not state.configs:
        freeze(model)
    method.apply(model, config, name)
    if config.modules_to_save:
        wrap_modules_to_save(model, config.modules_to_save, name)
    state.configs[name] = config
    set_trainable(model, name)
    install_adapter_names(model)  # model(..., adapter_names=[...]) runs as mixed_adapters does
    return model


def check_adapter_name(name: str) -> None:
    """Adapter names become nn.ModuleDict keys: no dots, not an nn.Module attribute."""
    if not isinstance(name, str) or not name or "." in name or hasattr(nn.ModuleDict, name):
        raise DeltatuneError(f"adapter name {name!r} is not usable: give a non-empty name without "
                             f"dots that is not an nn.Module attribute (e.g. 'sst2')")


def active_config(model: nn.Module) -> tuple[str, MethodConfig]:
    state = delta_state(model)
    if state.active is None or state.active not in state.configs:
        raise DeltatuneError("this model carries no active delta (call deltatune.apply or load_adapter first)")
    return state.active, state.configs[state.active]


def _active_method(model: nn.Module) -> Method:
    return get_method(active_config(model)[1].method)


def merge(model: nn.Module) -> nn.Module:
    """Fold the active delta into the base weights (LoRA: W' = W + scale·B·A)."""
    method = _active_method(model)
    if method.merge is None:
        raise DeltatuneError(f"cannot merge a {method.name} delta: {method.why_no_merge}")
    if is_quantized(model):
        raise DeltatuneError(
            f"cannot merge into the {describe(model)} base weights in place: rounding to "
            f"{describe(model)} would lose most of the delta; merge_and_unload (or `deltatune "
            "merge`) dequantizes the base first and returns a dense model")
    method.merge(model)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge` (W = W' - scale·B·A); a no-op when nothing is merged."""
    state = delta_state(model)
    for config in state.configs.values():
        method = get_method(config.method)
        if method.unmerge is not None:
            method.unmerge(model)
    return model


def training_loss_term(model: nn.Module) -> "torch.Tensor | None":
    """What the active delta's method adds to each training step's loss (AdaLoRA's
    orthogonality penalty), or None; the trainer adds it without knowing the method."""
    state = delta_state(model)
    if state.active is None or state.active not in state.configs:
        return None
    hook = get_method(state.configs[state.active].method).training_loss
    return hook(model, state.active) if hook is not None else None


def after_optimizer_step(model: nn.Module, step: int, total_steps: int) -> None:
    """Let the active delta's method act after optimizer step `step` (1-based) of
    `total_steps`, its gradients still there (AdaLoRA prunes ranks here)."""
    state = delta_state(model)
    if state.active is None or state.active not in state.configs:
        return
    hook = get_method(state.configs[state.active].method).after_step
    if hook is not None:
        hook(model, state.active, step, total_steps)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active delta and remove every wrapper: a plain transformers model again.

    On a quantized base the base is dequantized first (to the dtype of its embeddings), so the
    result is a dense model computing what the quantized one did, delta included."""
    if is_quantized(model):
        dequantize_model(model)
    merge(model)
    for path, layer in list(delta_layers(model)):
        set_parent(model, path, layer.unwrap())
    for param in model.parameters():
        param.requires_grad_(True)
    del model.deltatune_state
    remove_adapter_names(model)
    return model


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make adapter `name` the active (and only trainable) delta."""
    state = delta_state(model)
    if name not in state.configs:
        raise DeltatuneError(f"no adapter named {name!r} on this model (loaded: {', '.join(state.configs) or 'none'})")
    unmerge(model)
    set_trainable(model, name)
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes exactly what the bare base model computes."""
    merged = [layer for _, layer in delta_layers(model) if getattr(layer, "merged", None)]
    for layer in merged:
        layer.unmerge()
    with disabled(model):
        yield model
    for layer in merged:
        layer.merge()


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    state = delta_state(model)
    if name not in state.configs:
        raise DeltatuneError(f"no adapter named {name!r} on this model (loaded: {', '.join(state.configs) or 'none'})")
    for path, layer in list(delta_layers(model)):
        if getattr(layer, "merged", None) == name:
            layer.unmerge()
        if name in layer.deltas:
            del layer.deltas[name]
        if len(layer.deltas) == 0:
            set_parent(model, path, layer.base_layer)
        elif layer.active == name:
            layer.active = None
    for module in model.modules():
        hook = getattr(module, "deltatune_delete", None)
        if hook is not None:
            hook(name)
    del state.configs[name]
    if state.active == name:
        state.active = None
    if not state.configs:  # the bare model again: no hooks left behind
        remove_adapter_names(model)
    return model


# Methods whose whole state sits in DeltaLayer deltas (and modules_to_save copies), so taking
# those modules out and putting them back is a complete unload / reload.
DETACHABLE_METHODS = ("lora", "ia3", "oft", "boft", "loha", "lokr", "vera", "adalora", "ln-tuning",
                      "bitfit")


@dataclasses.dataclass
class DetachedAdapter:
    """An adapter taken off a model with its modules intact (see detach_adapter)."""

    name: str
    config: MethodConfig
    parts: dict[str, nn.Module]  # DeltaLayer path -> that layer's delta module for this adapter
    kinds: dict[str, type]       # DeltaLayer path -> the layer's class (LoraLayer, ModuleCopy, ...)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for part in self.parts.values() for p in part.parameters())


def detach_adapter(model: nn.Module, name: str) -> DetachedAdapter | None:
    """delete_adapter, keeping the adapter's modules for attach_adapter (a reload without reading,
    parsing, initialising or walking anything); None for methods that keep state elsewhere."""
    config = delta_state(model).configs.get(name)
    layers = [(path, layer) for path, layer in delta_layers(model) if name in layer.deltas]
    parts = {path: layer.deltas[name] for path, layer in layers}
    delete_adapter(model, name)
    if config is None or config.method not in DETACHABLE_METHODS:
        return None
    return DetachedAdapter(name, config, parts, {path: type(layer) for path, layer in layers})


def attach_adapter(model: nn.Module, detached: DetachedAdapter) -> bool:
    """Put a detached adapter back (inactive, like one more loaded adapter); False when a layer it
    came from is gone (every adapter there was removed, which unwraps the layer): load it again."""
    state = delta_state(model)
    if detached.name in state.configs:
        raise DeltatuneError(f"adapter {detached.name!r} already exists on this model")
    layers = []
    for path, part in detached.parts.items():
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            return False
        if type(layer) is not detached.kinds[path]:  # unwrapped (or since wrapped by another method)
            return False
        layers.append((layer, part))
    for layer, part in layers:
        layer.deltas[detached.name] = part
    state.configs[detached.name] = detached.config
    return True


def adapter_names(model: nn.Module) -> list[str]:
    return list(delta_state(model).configs)


def is_delta_layer(module: nn.Module) -> bool:
    return isinstance(module, DeltaLayer)
