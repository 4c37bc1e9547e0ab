"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"):
LoRA in SVD form whose rank is spent where it matters, pruned during training.

    y = x Wᵀ + b + (dropout(x) (A ⊙ E)ᵀ Bᵀ) · alpha / init_r
    A: (r, in), E: (r, 1) the "singular values", B: (out, r); E = 0 at start, so a fresh
    adapter is the base; A, B ~ N(0, 0.02)

Every layer starts at `init_r` triplets (a row of A, an entry of E, a column of B). After each
optimizer step the trainer calls the method's step hook (adalora_budget.py): it scores each
triplet by the smoothed sensitivity |θ · ∂L/∂θ| of its parameters and zeroes the E entries of the
lowest-scoring ones, so that the total rank over all layers follows a cubic schedule from
init_r × layers down to target_r × layers (`tinit` warm-up steps first, `tfinal` steps at the
final budget last). An orthogonality penalty on A and B (`orth_reg_weight`) keeps the triplets an
SVD. The file keeps only the surviving triplets and PEFT's `rank_pattern`, so it reloads (here
and in PEFT) at the pruned ranks. Mergeable like LoRA.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.base import (merge_functions, DeltaLayer, MethodConfig, check_module_names, delta_layers,
                                    module_names_hint, peft_key_map, set_parent)
from deltatune.methods.lora import _is_conv1d, _matches, _named, in_out_features, short_targets
from deltatune.methods.row_updates import AdditiveLinearLayer


def _is_int(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@dataclass
class AdaLoraConfig(MethodConfig):
    method = "adalora"
    peft_type = "ADALORA"

    init_r: int = 12              # triplets per layer at the start
    target_r: int = 8             # average triplets per layer at the end (the budget)
    alpha: float = 24             # scale = alpha / init_r (PEFT's lora_alpha); 2 × init_r as LoRA's 2r
    dropout: float = 0.0          # dropout on the update's input only (PEFT's lora_dropout)
    # as LoraConfig's: names (last path components), a regex (full match) or "all-linear"
    target_modules: list[str] | str = "all-linear"
    exclude_modules: list[str] | str | None = None
    tinit: int = 0                # warm-up steps at the initial budget
    tfinal: int = 0               # last steps at the final budget (the pattern then fixed)
    deltaT: int = 1               # steps between two allocations
    beta1: float = 0.85           # smoothing of the sensitivity (EMA)
    beta2: float = 0.85           # smoothing of its uncertainty (EMA)
    orth_reg_weight: float = 0.5  # weight of ‖AAᵀ - I‖ + ‖BᵀB - I‖ in the loss
    total_step: int | None = None  # steps of the schedule; None: the run's optimizer steps
    # which triplets survive per layer ("<module path>.lora_E": [bool] * init_r); written by
    # training, read when loading a pruned file. Rarely set by hand.
    rank_pattern: dict[str, list[bool]] | None = None

    def validate(self) -> None:
        super().validate()
        if not _is_int(self.init_r, 1):
            self.fail("init_r", f"must be a positive integer, got {self.init_r!r}")
        if not _is_int(self.target_r, 1):
            self.fail("target_r", f"must be a positive integer, got {self.target_r!r}")
        if self.target_r > self.init_r:
            self.fail("target_r", f"must be at most init_r ({self.init_r}): AdaLoRA only prunes, "
                                  f"got {self.target_r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            self.fail("alpha", f"must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            self.fail("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is None:  # no default set of targets: they must be named
            self.fail("target_modules", "must be a non-empty list of module names or a regex, got None")
        if self.target_modules != "all-linear":
            check_module_names(self, "target_modules")
        check_module_names(self, "exclude_modules")
        for name in ("tinit", "tfinal"):
            if not _is_int(getattr(self, name), 0):
                self.fail(name, f"must be a whole number of steps >= 0, got {getattr(self, name)!r}")
        if not _is_int(self.deltaT, 1):
            self.fail("deltaT", f"must be a positive whole number of steps, got {self.deltaT!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                self.fail(name, f"must be in (0, 1), got {value!r}")
        if isinstance(self.orth_reg_weight, bool) or not isinstance(self.orth_reg_weight, (int, float)) \
                or self.orth_reg_weight < 0:
            self.fail("orth_reg_weight", f"must be a number >= 0, got {self.orth_reg_weight!r}")
        if self.total_step is not None:
            if not _is_int(self.total_step, 1):
                self.fail("total_step", f"must be a positive whole number or null, got {self.total_step!r}")
            self.check_schedule(self.total_step, "total_step")
        if self.rank_pattern is not None and not (isinstance(self.rank_pattern, dict) and all(
                isinstance(v, list) and len(v) == self.init_r and all(isinstance(b, bool) for b in v)
                for v in self.rank_pattern.values())):
            self.fail("rank_pattern", f"must map module paths to {self.init_r} (init_r) true/false "
                                      f"values each")

    def check_schedule(self, total_step: int, where: str) -> None:
        """tinit warm-up + pruning + tfinal must fit in the run's steps (at least one step pruning)."""
        if self.tinit >= total_step - self.tfinal:
            self.fail("tinit", f"tinit ({self.tinit}) + tfinal ({self.tfinal}) leave no step to prune "
                               f"in {total_step} steps ({where}); lower them or train longer")

    @property
    def scale(self) -> float:
        """alpha / init_r, as PEFT computes it (its 1e-5 keeps an empty layer finite)."""
        return float(self.alpha) / (self.init_r + 1e-5)


# ------------------------------------------------------------------ modules
class AdaLoraDelta(nn.Module):
    """One layer's triplets; parameter names and shapes are PEFT's: lora_A, lora_E, lora_B.

    `slots[j]`: which of the layer's init_r triplets row j is (all of them, or those a loaded
    rank_pattern kept); `kept[j]`: whether the budget keeps it now (pruned ones have E = 0)."""

    def __init__(self, in_features: int, out_features: int, config: AdaLoraConfig,
                 slots: list[int]) -> None:
        super().__init__()
        rank = len(slots)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_E = nn.Parameter(torch.zeros(rank, 1))   # zero: the adapter starts as the base
        self.lora_B = nn.Parameter(torch.empty(out_features, rank))
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        self.scale = config.scale
        self.init_r = config.init_r
        self.slots = list(slots)
        self.kept = torch.ones(rank, dtype=torch.bool)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.importance: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # see adalora_budget

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scale  # (out, in)

    def pattern(self) -> list[bool]:
        """PEFT's rank_pattern entry: which of the init_r triplets survive."""
        alive = {slot for slot, keep in zip(self.slots, self.kept.tolist()) if keep}
        return [i in alive for i in range(self.init_r)]


class AdaLoraLayer(AdditiveLinearLayer):
    """A linear layer (nn.Linear or GPT-2's Conv1D) with named AdaLoRA deltas."""

    PARAMETER = "lora_A"  # outside autocast the input is cast to the delta's dtype


# ------------------------------------------------------------------ apply, merge
def find_adalora_targets(model: nn.Module, config: AdaLoraConfig) -> list[str]:
    paths = []
    for path, module in model.named_modules():
        if ".deltas." in path or path.endswith(".base_layer") or not _matches(path, config.target_modules, model):
            continue
        if config.exclude_modules and _named(path, config.exclude_modules):
            continue
        if isinstance(module, DeltaLayer) and not isinstance(module, AdaLoraLayer):
            raise DeltatuneError(f"AdaLoraConfig.target_modules: {path} already carries another method's "
                                 f"delta ({type(module).__name__}); AdaLoRA cannot share a layer with it")
        if isinstance(module, (nn.Linear, AdaLoraLayer)) or _is_conv1d(module):
            paths.append(path)
    return paths


def apply_adalora(model: nn.Module, config: AdaLoraConfig, name: str) -> None:
    targets = find_adalora_targets(model, config)
    if not targets:
        raise DeltatuneError(f"AdaLoraConfig.target_modules: {config.target_modules!r} matched no linear "
                             f"module (some that exist: {module_names_hint(model)})")
    pattern = config.rank_pattern or {}
    unknown = sorted(set(pattern) - {f"{p}.lora_E" for p in targets})
    if unknown:
        raise DeltatuneError(f"AdaLoraConfig.rank_pattern: {unknown[0]!r} names no targeted layer")
    for path in targets:
        module = model.get_submodule(path)
        if not isinstance(module, AdaLoraLayer):
            module = AdaLoraLayer(module)
            set_parent(model, path, module)
        weight = module.base_layer.weight
        in_f, out_f = in_out_features(module.base_layer)
        keep = pattern.get(f"{path}.lora_E", [True] * config.init_r)
        delta = AdaLoraDelta(in_f, out_f, config, [i for i, k in enumerate(keep) if k])
        delta = delta.to(device=weight.device, dtype=torch.float64 if weight.dtype == torch.float64 else None)
        module.add_delta(name, delta)


def adalora_deltas(model: nn.Module, name: str) -> list[tuple[str, AdaLoraDelta]]:
    return [(path, layer.deltas[name]) for path, layer in delta_layers(model)
            if isinstance(layer, AdaLoraLayer) and name in layer.deltas]


def adalora_layers(model: nn.Module) -> list[AdaLoraLayer]:
    return [layer for _, layer in delta_layers(model) if isinstance(layer, AdaLoraLayer)]


merge_adalora, unmerge_adalora = merge_functions(AdaLoraLayer)


# ------------------------------------------------------------------ the file
PREFIX = "base_model.model."


def adalora_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Only the surviving triplets (PEFT drops the pruned ones the same way); a trained head too."""
    tensors = {k: v.detach() for k, v in peft_key_map(model, name).items()}
    for path, delta in adalora_deltas(model, name):
        kept = delta.kept.to(delta.lora_A.device)
        tensors[f"{PREFIX}{path}.lora_A"] = delta.lora_A.detach()[kept]
        tensors[f"{PREFIX}{path}.lora_E"] = delta.lora_E.detach()[kept]
        tensors[f"{PREFIX}{path}.lora_B"] = delta.lora_B.detach()[:, kept]
    return tensors


def adalora_load_state_dict(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load a file into the live deltas. A file pruned below the live ranks (a run's checkpoint,
    saved mid-schedule, resumed into full-rank layers) goes back into its slots by the
    rank_pattern saved beside it; the pruned triplets come back as E = 0, as pruning left them."""
    from deltatune.methods import default_load_state_dict

    live = peft_key_map(model, name)
    if all(tuple(tensors[k].shape) == tuple(v.shape) for k, v in live.items() if k in tensors):
        return default_load_state_dict(model, name, tensors, source)
    config_path = Path(source).with_name("adapter_config.json")
    pattern = json.loads(config_path.read_text()).get("rank_pattern") if config_path.is_file() else None
    if not pattern:
        return default_load_state_dict(model, name, tensors, source)  # names the mismatch
    tensors = dict(tensors)
    for path, delta in adalora_deltas(model, name):
        keep = pattern.get(f"{path}.lora_E", [True] * delta.init_r)
        rows = [j for j, slot in enumerate(delta.slots) if keep[slot]]
        prefix = f"{PREFIX}{path}"
        if f"{prefix}.lora_E" not in tensors or tensors[f"{prefix}.lora_E"].shape[0] != len(rows):
            continue  # let the default loader name what is wrong
        index = torch.tensor(rows, dtype=torch.long)
        for key, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            full = getattr(delta, key).detach().clone().cpu()
            if key == "lora_E":
                full.zero_()
            tensors[f"{prefix}.{key}"] = full.index_copy(dim, index, tensors[f"{prefix}.{key}"].to(full.dtype))
        delta.kept = torch.tensor([bool(keep[slot]) for slot in delta.slots])
    default_load_state_dict(model, name, tensors, source)


def rank_pattern(model: nn.Module, name: str) -> dict[str, list[bool]] | None:
    """PEFT's rank_pattern for the file, or None while no layer has lost a triplet."""
    pattern = {f"{path}.lora_E": delta.pattern() for path, delta in adalora_deltas(model, name)}
    return pattern if not all(all(v) for v in pattern.values()) else None


def adalora_to_peft(config: AdaLoraConfig, model: nn.Module, name: str) -> dict:
    targets, exclude = config.target_modules, config.exclude_modules
    if isinstance(targets, str):
        paths = sorted(path for path, _ in adalora_deltas(model, name))
        if targets == "all-linear":
            targets, exclude = short_targets(model, paths)
        else:
            targets = "^(" + "|".join(re.escape(p) for p in paths) + ")$"
    # PEFT refuses a config without a schedule that fits; the steps matter only for training
    total_step = config.total_step or config.tinit + config.tfinal + 1
    return {"init_r": config.init_r, "target_r": config.target_r, "lora_alpha": config.alpha,
            "lora_dropout": config.dropout, "target_modules": targets, "exclude_modules": exclude,
            "tinit": config.tinit, "tfinal": config.tfinal, "deltaT": config.deltaT,
            "beta1": config.beta1, "beta2": config.beta2, "orth_reg_weight": config.orth_reg_weight,
            "total_step": total_step, "rank_pattern": rank_pattern(model, name),
            "bias": "none", "init_lora_weights": True,
            "fan_in_fan_out": any(l.transposed for l in adalora_layers(model))}


def adalora_from_peft(values: dict) -> AdaLoraConfig:
    if values.get("bias", "none") != "none":
        raise DeltatuneError(f"adapter_config.json: AdaLoRA bias {values['bias']!r} is not supported")
    targets, exclude = values.get("target_modules"), values.get("exclude_modules")
    targets = list(targets) if isinstance(targets, (set, tuple)) else targets
    exclude = list(exclude) if isinstance(exclude, (set, tuple)) else exclude
    return AdaLoraConfig(
        init_r=values.get("init_r", 12), target_r=values.get("target_r", 8),
        alpha=values.get("lora_alpha", 8), dropout=values.get("lora_dropout", 0.0),
        target_modules=targets, exclude_modules=exclude or None,
        tinit=values.get("tinit", 0), tfinal=values.get("tfinal", 0), deltaT=values.get("deltaT", 1),
        beta1=values.get("beta1", 0.85), beta2=values.get("beta2", 0.85),
        orth_reg_weight=values.get("orth_reg_weight", 0.5), total_step=values.get("total_step"),
        rank_pattern=values.get("rank_pattern"), modules_to_save=values.get("modules_to_save"))


from deltatune.methods import Method  # noqa: E402  (the registry imports this module)
from deltatune.methods import adalora_budget  # noqa: E402  (the step hooks)


def _allocate(model: nn.Module, name: str, step: int, total_steps: int) -> None:
    adalora_budget.allocate(model, name, step, total_steps, [d for _, d in adalora_deltas(model, name)])


def _orthogonality_penalty(model: nn.Module, name: str) -> torch.Tensor | None:
    return adalora_budget.orthogonality_penalty(model, name, [d for _, d in adalora_deltas(model, name)])


METHOD = Method(name="adalora", config=AdaLoraConfig, apply=apply_adalora, to_peft=adalora_to_peft,
                from_peft=adalora_from_peft, state_dict=adalora_state_dict,
                load_state_dict=adalora_load_state_dict,
                merge=merge_adalora, unmerge=unmerge_adalora,
                training_loss=_orthogonality_penalty, after_step=_allocate,
                # MiniLM/SST-2 demo budget (8,000 rows, one epoch): lr 1e-3 54.1% (E starts at 0
                # and A, B at N(0, 0.02): the update grows slowly), 1e-2 82.8%
                default_lr=1e-2,
                search_space={"init_r": [12, 16], "target_r": [4, 8]})
