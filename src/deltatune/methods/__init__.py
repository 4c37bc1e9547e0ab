"""The method registry: name -> Method (config class, apply, save/load mapping, merge).

A method registers by defining `METHOD = Method(...)` in its own file and being listed in
`_METHOD_MODULES`; the conformance tests then cover it automatically. A method may also name
variants — presets of its options ("dora" is lora with use_dora: true) — that run configs and
`compare` pick like methods; the conformance tests cover every variant too.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from deltatune.config.run import RunConfig
from deltatune.errors import DeltatuneError
from deltatune.methods.base import MethodConfig, peft_key_map
from deltatune.quantization import parse_quantize

StateDict = dict[str, torch.Tensor]


def default_state_dict(model: nn.Module, name: str) -> StateDict:
    return {k: v.detach() for k, v in peft_key_map(model, name).items()}


def default_load_state_dict(model: nn.Module, name: str, tensors: StateDict, source: str) -> None:
    """Copy PEFT-keyed tensors into the live deltas; every key and shape must match."""
    live = peft_key_map(model, name)
    missing = sorted(set(live) - set(tensors))
    unexpected = sorted(set(tensors) - set(live))
    if unexpected:
        raise DeltatuneError(f"{source}: tensor {unexpected[0]!r} has no place in this base model "
                             f"({len(unexpected)} such tensors) — adapter saved for another model?")
    if missing:
        raise DeltatuneError(f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing)")
    for key, target in live.items():
        value = tensors[key]
        if tuple(value.shape) != tuple(target.shape):
            raise DeltatuneError(
                f"{source}: tensor {key!r} has shape {tuple(value.shape)} but this base model "
                f"expects {tuple(target.shape)} — adapter saved for another base?")
        with torch.no_grad():
            target.copy_(value.to(target.dtype))


@dataclass(frozen=True)
class Method:
    name: str
    config: type[MethodConfig]
    apply: Callable[[nn.Module, MethodConfig, str], None]
    # adapter_config.json fields beyond peft_type/task_type/base (PEFT's names where PEFT has them)
    to_peft: Callable[[MethodConfig, nn.Module, str], dict]
    from_peft: Callable[[dict], MethodConfig]
    state_dict: Callable[[nn.Module, str], StateDict] = default_state_dict
    load_state_dict: Callable[[nn.Module, str, StateDict, str], None] = default_load_state_dict
    merge: Callable[[nn.Module], None] | None = None
    unmerge: Callable[[nn.Module], None] | None = None
    why_no_merge: str = ""   # said to the user when merge is asked of a method that cannot
    # A learning rate that works for this method out of the box (AdamW, batch ~32): they differ
    # by orders of magnitude (full ~5e-5, LoRA/adapters ~5e-4, prompt methods ~1e-2).
    default_lr: float = 5e-4
    # Named presets of this method's options, chosen like methods: {"dora": {"use_dora": True}}.
    variants: dict[str, dict] = field(default_factory=dict)
    # What `compare.search` tunes besides the lr (always searched, log-uniform around the default):
    # option -> (low, high, "log" | "linear") for a range, or a list of choices. {}: the lr only.
    search_space: dict[str, tuple | list] = field(default_factory=dict)
    # The saved form of a delta whose training form only fits a changed base (PiSSA/OLoRA):
    # (model, name, PEFT-keyed tensors, adapter_config.json fields) -> the same, loadable on the
    # unmodified base. save_adapter applies it unless asked for the trainable form (checkpoints).
    export_form: Callable[[nn.Module, str, StateDict, dict], tuple[StateDict, dict]] | None = None
    # Its inverse for loading: (model, adapter_config.json, tensors) -> the same, as the delta to
    # add to this model's unmodified base (load_adapter calls it before applying).
    import_form: Callable[[nn.Module, dict, StateDict], tuple[dict, StateDict]] | None = None
    # Per-parameter learning-rate multipliers the optimizer applies, from the run's train options
    # (LoRA+: B's lr a multiple of A's): (config, train section) -> ((name, parameter) -> factor),
    # or None for one lr. The trainer asks through `lr_multipliers_for`, knowing no method.
    lr_multipliers: Callable[[MethodConfig, object], Callable[[str, nn.Parameter], float] | None] | None = None
    train_options: tuple[str, ...] = ()  # method-specific train.* keys it reads (METHOD_TRAIN_OPTIONS)
    # Training-time hooks, for methods that act during training beyond the gradient step
    # (AdaLoRA): a term added to each optimizer step's loss (None: nothing to add) ...
    training_loss: Callable[[nn.Module, str], torch.Tensor | None] | None = None
    # ... and a call after each optimizer step, gradients still there: (model, adapter, step
    # (1-based), the run's total steps).
    after_step: Callable[[nn.Module, str, int, int], None] | None = None


# train.* keys that only some methods understand; set for another method they are an error
METHOD_TRAIN_OPTIONS = ("loraplus_lr_ratio",)

_METHOD_MODULES = ("full", "lora", "adapter", "prompt", "ptuning", "prefix", "ia3",
                   "oft", "boft", "loha", "lokr", "vera", "adalora", "ln_tuning", "bitfit")


def load_methods(module_names: Iterable[str]) -> dict[str, Method]:
    """name -> Method, from each listed module of this package. A listed module that does not
    import is an error naming it: skipped, its method would only surface later, and elsewhere,
    as an "unknown method"."""
    methods = {}
    for module_name in module_names:
        qualified = f"{__name__}.{module_name}"
        try:
            module = importlib.import_module(qualified)
        except ImportError as exc:
            raise ImportError(f"{qualified}: the method module listed in {__name__}._METHOD_MODULES "
                              f"failed to import: {exc}", name=qualified) from exc
        methods[module.METHOD.name] = module.METHOD
    return methods


REGISTRY: dict[str, Method] = load_methods(_METHOD_MODULES)
# variant name -> (its method's name, the options it presets)
VARIANTS: dict[str, tuple[str, dict]] = {
    variant: (method.name, options) for method in REGISTRY.values()
    for variant, options in method.variants.items()}


def method_names() -> list[str]:
    """Every name a run config's method.name or compare.methods accepts: methods, then variants."""
    return [*REGISTRY, *VARIANTS]


def get_method(name: str) -> Method:
    if name in VARIANTS:
        name = VARIANTS[name][0]
    if name not in REGISTRY:
        raise DeltatuneError(f"unknown method {name!r}; known methods: {', '.join(method_names())}")
    return REGISTRY[name]


def default_lr_for(config: MethodConfig) -> float:
    """The lr a run uses when none is given: the config's own suggestion (an option may change
    what works, e.g. a prefix made by an LSTM), else the method's default_lr."""
    suggested = config.suggested_lr()
    return suggested if suggested is not None else get_method(config.method).default_lr


def method_for_peft_type(peft_type: str, source: str) -> Method:
    for method in REGISTRY.values():
        if method.config.peft_type == peft_type:
            return method
    known = ", ".join(m.config.peft_type for m in REGISTRY.values())
    raise DeltatuneError(f"{source}: unknown peft_type {peft_type!r} (known: {known})")


def method_config_for(run: RunConfig) -> MethodConfig:
    """A run config's `method:` as its method's validated config, checked against `quantize:`
    before anything loads: a base frozen in integer codes cannot be fully fine-tuned."""
    config = config_from_dict(run.method)
    quantization = parse_quantize(run.quantize)
    if quantization is not None and config.method == "full":
        raise DeltatuneError(f"quantize: {quantization.type} freezes the base in integer codes, which "
                             "full fine-tuning cannot train; use a PEFT method or quantize: none")
    if getattr(config, "init", None) == "loftq" and (quantization is None or quantization.bits != 4):
        raise DeltatuneError("method.init: loftq fits the adapter to a 4-bit base's quantization error; "
                             "set quantize: nf4 (or fp4)")
    check_train_options(config, run.train)
    return config


def check_train_options(config: MethodConfig, train: object) -> None:
    """A method-specific train.* key set for a method that does not read it: one line."""
    method = get_method(config.method)
    for option in METHOD_TRAIN_OPTIONS:
        if getattr(train, option, None) is not None and option not in method.train_options:
            readers = [n for m in REGISTRY.values() if option in m.train_options for n in (m.name, *m.variants)]
            raise DeltatuneError(f"train.{option}: applies to {', '.join(readers)} only, not to "
                                 f"method {method.name!r}")


def lr_multipliers_for(config: MethodConfig, train: object) -> Callable[[str, nn.Parameter], float] | None:
    """(parameter name, parameter) -> lr multiplier for this method and train options, or None."""
    check_train_options(config, train)
    method = get_method(config.method)
    return method.lr_multipliers(config, train) if method.lr_multipliers is not None else None


def config_from_dict(values: dict) -> MethodConfig:
    """A method config from a run config's `method:` mapping (`name` picks the method)."""
    name = values.get("name", values.get("method"))
    if name is None:
        raise DeltatuneError("method.name: missing (one of: " + ", ".join(REGISTRY) + ")")
    if name not in REGISTRY and name not in VARIANTS:
        raise DeltatuneError(f"method.name: unknown method {name!r}; known methods: {', '.join(method_names())}")
    if name in VARIANTS:  # the variant's presets, then whatever the config says on top
        values = {**VARIANTS[name][1], **values}
    return get_method(name).config.from_dict(values)
