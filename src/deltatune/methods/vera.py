"""VeRA (Kopiczko et al. 2024, "Vector-based Random Matrix Adaptation"): LoRA's low-rank update
with both matrices frozen, random and shared by every layer; only two vectors per layer train.

    y = x Wᵀ + b + λ_b ⊙ (B · (λ_d ⊙ (A · dropout(x))))
    A: (r, max in), B: (max out, r)  frozen, one pair per adapter, sliced to each layer's shape
    λ_d: (r,) starts at d_initial, λ_b: (out,) starts at 0, so a fresh adapter is the base

A and B come from a seeded generator (Kaiming-uniform, PEFT's `projection_prng_key`), so a file
may leave them out (`save_projection: false`) and they are regenerated on load; with the default
`save_projection: true` they are stored once per file (PEFT's `base_model.vera_A` / `vera_B`).
The update is B·A with rows and columns scaled, so it folds into W (merge) and out again.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.base import (merge_functions, DeltaLayer, MethodConfig, delta_layers, module_names_hint,
                                    peft_key_map, set_parent)
from deltatune.methods.lora import _is_conv1d, _matches, in_out_features, short_targets
from deltatune.methods.row_updates import AdditiveLinearLayer

PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")


@dataclass
class VeraConfig(MethodConfig):
    method = "vera"
    peft_type = "VERA"

    r: int = 256                  # rank of the shared projections: VeRA's ranks are LoRA's × 10-30
    # module names (last path components), a regex (full match on the path) or "all-linear"
    # (every linear projection inside the transformer layers), as LoraConfig's
    target_modules: list[str] | str = "all-linear"
    projection_prng_key: int = 0  # seed of the frozen projections A and B
    save_projection: bool = True  # store A and B in the file (else regenerated from the seed)
    vera_dropout: float = 0.0     # dropout on the update's input only
    d_initial: float = 0.1        # λ_d's starting value (the paper: small, <= 0.1)

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            self.fail("r", f"must be a positive integer, got {self.r!r}")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                try:
                    re.compile(self.target_modules)
                except re.error as exc:
                    self.fail("target_modules", f"is not a valid regex ({exc})")
        elif not (isinstance(self.target_modules, list) and self.target_modules
                  and all(isinstance(t, str) for t in self.target_modules)):
            self.fail("target_modules", f"must be a non-empty list of names, a regex or "
                                        f"'all-linear', got {self.target_modules!r}")
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            self.fail("projection_prng_key", f"must be an integer, got {self.projection_prng_key!r}")
        if not isinstance(self.save_projection, bool):
            self.fail("save_projection", f"must be true or false, got {self.save_projection!r}")
        if isinstance(self.vera_dropout, bool) or not isinstance(self.vera_dropout, (int, float)) \
                or not 0.0 <= self.vera_dropout < 1.0:
            self.fail("vera_dropout", f"must be in [0, 1), got {self.vera_dropout!r}")
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, (int, float)):
            self.fail("d_initial", f"must be a number, got {self.d_initial!r}")


# ------------------------------------------------------------------ the frozen projections
def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-b, b), b = sqrt(6 / fan_in): Kaiming-uniform with gain sqrt(2), drawn from `generator`
    (the draw PEFT makes, so the same seed gives the same matrices)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections_from_seed(seed: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vera_A = kaiming_uniform((r, max_in), generator)     # drawn first, as PEFT does
    vera_B = kaiming_uniform((max_out, r), generator)
    return vera_A, vera_B


class VeraProjections(nn.Module):
    """One adapter's frozen A and B, a child of each of its layers' deltas (the same module
    object: stored once, moved and cast once). Non-persistent buffers: saved once per file by
    vera_state_dict, never per layer."""

    def __init__(self, vera_A: torch.Tensor, vera_B: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("vera_A", vera_A, persistent=False)
        self.register_buffer("vera_B", vera_B, persistent=False)


class VeraDelta(nn.Module):
    """λ_b and λ_d of one layer (PEFT's vera_lambda_b / vera_lambda_d) and the shared projections."""

    def __init__(self, in_features: int, out_features: int, projections: VeraProjections,
                 config: VeraConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features))
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial)))
        self.projections = projections
        self.dropout = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's A (r, in) and B (out, r): the first in columns / out rows of the shared pair."""
        return (self.projections.vera_A[:, :self.in_features],
                self.projections.vera_B[:self.out_features, :])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vera_A, vera_B = self.sliced()
        if not torch.is_autocast_enabled(x.device.type):
            vera_A, vera_B = vera_A.to(x.dtype), vera_B.to(x.dtype)
        hidden = F.linear(self.dropout(x), vera_A) * self.vera_lambda_d
        return F.linear(hidden, vera_B) * self.vera_lambda_b

    def delta_weight(self) -> torch.Tensor:
        """(λ_b ⊙ B) · (λ_d ⊙ A): (out, in)."""
        vera_A, vera_B = self.sliced()
        return (self.vera_lambda_b.unsqueeze(1) * vera_B) @ (self.vera_lambda_d.unsqueeze(1) * vera_A)


class VeraLayer(AdditiveLinearLayer):
    """A linear layer (nn.Linear or GPT-2's Conv1D) with named VeRA deltas."""

    PARAMETER = "vera_lambda_b"  # outside autocast the input is cast to the delta's dtype


# ------------------------------------------------------------------ targeting and apply
def find_vera_targets(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    paths = []
    for path, module in model.named_modules():
        if ".deltas." in path or path.endswith(".base_layer") or not _matches(path, target_modules, model):
            continue
        if isinstance(module, DeltaLayer) and not isinstance(module, VeraLayer):
            raise DeltatuneError(f"VeraConfig.target_modules: {path} already carries another method's "
                                 f"delta ({type(module).__name__}); VeRA cannot share a layer with it")
        if isinstance(module, (nn.Linear, VeraLayer)) or _is_conv1d(module):
            paths.append(path)
    return paths


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, VeraLayer) else module


def apply_vera(model: nn.Module, config: VeraConfig, name: str) -> None:
    targets = find_vera_targets(model, config.target_modules)
    if not targets:
        raise DeltatuneError(f"VeraConfig.target_modules: {config.target_modules!r} matched no linear "
                             f"module (some that exist: {module_names_hint(model)})")
    shapes = {path: in_out_features(_base(model.get_submodule(path))) for path in targets}
    max_in = max(i for i, _ in shapes.values())
    max_out = max(o for _, o in shapes.values())
    reference = _base(model.get_submodule(targets[0])).weight
    dtype = torch.float64 if reference.dtype == torch.float64 else torch.float32
    vera_A, vera_B = projections_from_seed(config.projection_prng_key, config.r, max_in, max_out)
    projections = VeraProjections(vera_A, vera_B).to(device=reference.device, dtype=dtype)
    for path in targets:
        module = model.get_submodule(path)
        if not isinstance(module, VeraLayer):
            module = VeraLayer(module)
            set_parent(model, path, module)
        in_f, out_f = shapes[path]
        delta = VeraDelta(in_f, out_f, projections, config).to(device=reference.device, dtype=dtype)
        module.add_delta(name, delta)


def vera_layers(model: nn.Module) -> list[VeraLayer]:
    return [layer for _, layer in delta_layers(model) if isinstance(layer, VeraLayer)]


merge_vera, unmerge_vera = merge_functions(VeraLayer)


def adapter_projections(model: nn.Module, name: str) -> VeraProjections:
    for layer in vera_layers(model):
        if name in layer.deltas:
            return layer.deltas[name].projections
    raise DeltatuneError(f"adapter {name!r} has no VeRA layers")


# ------------------------------------------------------------------ the file
def vera_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    tensors = {k: v.detach() for k, v in peft_key_map(model, name).items()}
    config = model.deltatune_state.configs[name]
    if config.save_projection:
        projections = adapter_projections(model, name)
        tensors[PROJECTION_KEYS[0]] = projections.vera_A.detach()
        tensors[PROJECTION_KEYS[1]] = projections.vera_B.detach()
    return tensors


def vera_load_state_dict(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    from deltatune.methods import default_load_state_dict

    stored = [k for k in PROJECTION_KEYS if k in tensors]
    config = model.deltatune_state.configs[name]
    if config.save_projection and len(stored) < 2:
        raise DeltatuneError(f"{source}: tensor {PROJECTION_KEYS[len(stored)]!r} is missing, but the "
                             f"config says save_projection: true (the projections are stored)")
    default_load_state_dict(model, name, {k: v for k, v in tensors.items() if k not in PROJECTION_KEYS}, source)
    if len(stored) == 2:  # stored ones win over the regenerated ones (they are exact everywhere)
        projections = adapter_projections(model, name)
        for key, buffer in zip(PROJECTION_KEYS, (projections.vera_A, projections.vera_B)):
            if tuple(tensors[key].shape) != tuple(buffer.shape):
                raise DeltatuneError(f"{source}: tensor {key!r} has shape {tuple(tensors[key].shape)} "
                                     f"but this base model expects {tuple(buffer.shape)}")
            with torch.no_grad():
                buffer.copy_(tensors[key].to(buffer.dtype))


def vera_to_peft(config: VeraConfig, model: nn.Module, name: str) -> dict:
    targets = config.target_modules
    if isinstance(targets, str):  # the exact set wrapped, in the form PEFT reads back
        paths = sorted(p for p, l in delta_layers(model) if isinstance(l, VeraLayer) and name in l.deltas)
        if targets == "all-linear":
            targets, exclude = short_targets(model, paths)
            if exclude:  # PEFT's VeraConfig has no exclude_modules: name the paths instead
                targets = "^(" + "|".join(re.escape(p) for p in paths) + ")$"
        else:
            targets = "^(" + "|".join(re.escape(p) for p in paths) + ")$"
    return {"r": config.r, "target_modules": targets, "projection_prng_key": config.projection_prng_key,
            "save_projection": config.save_projection, "vera_dropout": config.vera_dropout,
            "d_initial": config.d_initial, "bias": "none", "init_weights": True,
            "fan_in_fan_out": any(l.transposed for l in vera_layers(model))}


def vera_from_peft(values: dict) -> VeraConfig:
    if values.get("bias", "none") != "none":
        raise DeltatuneError(f"adapter_config.json: VeRA bias {values['bias']!r} is not supported (only 'none')")
    if values.get("layers_to_transform") is not None:
        raise DeltatuneError("adapter_config.json: VeRA layers_to_transform is not supported")
    targets = values.get("target_modules")
    if isinstance(targets, (set, tuple)):
        targets = list(targets)
    return VeraConfig(r=values.get("r", 256), target_modules=targets,
                      projection_prng_key=values.get("projection_prng_key", 0),
                      save_projection=bool(values.get("save_projection", True)),
                      vera_dropout=values.get("vera_dropout", 0.0),
                      d_initial=values.get("d_initial", 0.1),
                      modules_to_save=values.get("modules_to_save"))


from deltatune.methods import Method  # noqa: E402  (the registry imports this module)

METHOD = Method(name="vera", config=VeraConfig, apply=apply_vera, to_peft=vera_to_peft,
                from_peft=vera_from_peft, state_dict=vera_state_dict,
                load_state_dict=vera_load_state_dict, merge=merge_vera, unmerge=unmerge_vera,
                default_lr=1e-2,
                search_space={"r": [128, 256, 512]})
