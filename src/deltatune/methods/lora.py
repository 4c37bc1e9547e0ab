"""LoRA (Hu et al. 2021): a frozen linear layer W plus a low-rank update scale·B·A.

    y = x Wᵀ + scale · (dropout(x) Aᵀ) Bᵀ        A: (r, in), B: (out, r), B = 0 at start
    scale = alpha / r   (or alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023)

With `use_dora` the same layer is DoRA (weight-decomposed LoRA, Liu et al. 2024): an extra
magnitude vector rescales each output row; its math lives in `dora`.

Merging folds scale·B·A into W (and unmerging subtracts it again) so inference costs nothing.
Works on nn.Linear and GPT-2's Conv1D, whose weight is stored transposed: (in, out).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods import dora  # noqa: F401  (DoRA math, see dora.py)
from deltatune.methods import lora_init  # PiSSA, OLoRA, LoftQ and their files, see lora_init.py
from deltatune.methods import lora_rows  # mixed-adapter batches, see lora_rows.py
from deltatune.methods.base import DeltaLayer, MethodConfig, delta_layers, module_names_hint, set_parent


@dataclass
class LoraConfig(MethodConfig):
    method = "lora"
    peft_type = "LORA"

    r: int = 8                    # rank of the update; 8 is plenty for classification heads
    alpha: float = 16             # scale = alpha / r: alpha = 2r keeps the update's size stable
    dropout: float = 0.0          # dropout on the LoRA input only (the base path is untouched)
    # module names (matched on the last path components), a regex (full match on the path),
    # or "all-linear" (every linear projection inside the transformer layers, never the head).
    # all-linear is the default: at the same rank it learns far more per step than query/value
    # alone (SST-2/MiniLM: 84.4% vs 80.3% dev on the same budget) for little extra cost, since
    # the frozen forward/backward dominates the step.
    target_modules: list[str] | str = "all-linear"
    # modules never wrapped though target_modules matches them: names matched like target_modules'
    # (last path components), or a regex (full match on the path); peft's exclude_modules
    exclude_modules: list[str] | str | None = None
    use_rslora: bool = False      # scale = alpha / sqrt(r), better for large ranks
    # default: A Kaiming-uniform, B zero; gaussian: A ~ N(0, 1/r); pissa (pissa_niter_N): B·A the
    # top-r singular part of W, the base keeps the rest; olora: B·A from W's QR factors; loftq
    # (a 4-bit base): B·A fits the quantization error. PEFT's init_lora_weights (lora_init.py)
    init: str = "default"
    loftq_iter: int = 1           # loftq: alternating quantize / low-rank-fit rounds (>1 refits the codes)
    # DoRA: also learn each output row's magnitude (PEFT's lora_magnitude_vector). Learns more
    # like full fine-tuning at the same rank, for one extra (out, in) product per layer and step.
    use_dora: bool = False

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            self.fail("r", f"must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            self.fail("alpha", f"must be a positive number, got {self.alpha!r}")
        if not (0.0 <= float(self.dropout) < 1.0):
            self.fail("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_dora, bool):
            self.fail("use_dora", f"must be true or false, got {self.use_dora!r}")
        if not lora_init.valid_init(self.init):
            self.fail("init", f"must be one of {', '.join(lora_init.INITS)} or pissa_niter_N, "
                              f"got {self.init!r}")
        if not isinstance(self.loftq_iter, int) or isinstance(self.loftq_iter, bool) or self.loftq_iter < 1:
            self.fail("loftq_iter", f"must be a positive integer, got {self.loftq_iter!r}")
        if self.use_dora and lora_init.changes_base(self.init):
            self.fail("init", f"{self.init} with use_dora: a DoRA adapter trained on the residual "
                              "base cannot be converted to load on the unmodified one; use one or the other")
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
        exclude = self.exclude_modules
        if isinstance(exclude, str):
            try:
                re.compile(exclude)
            except re.error as exc:
                self.fail("exclude_modules", f"is not a valid regex ({exc})")
        elif exclude is not None and not (isinstance(exclude, list) and all(isinstance(t, str) for t in exclude)):
            self.fail("exclude_modules", f"must be a list of names, a regex or null, got {exclude!r}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


# ------------------------------------------------------------------ pure functions of tensors
def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                 transposed: bool = False) -> torch.Tensor:
    """scale · B · A, shaped like the base weight ((out, in), or (in, out) for Conv1D)."""
    delta = (lora_B @ lora_A) * scale  # (out, in)
    return delta.T if transposed else delta


def merge_into(weight: torch.Tensor, delta: torch.Tensor) -> None:
    weight.data += delta.to(weight.dtype)


def unmerge_from(weight: torch.Tensor, delta: torch.Tensor) -> None:
    weight.data -= delta.to(weight.dtype)


# ------------------------------------------------------------------ modules
def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def in_out_features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    raise DeltatuneError(f"LoRA supports nn.Linear and Conv1D, not {type(module).__name__}")


class LoraDelta(nn.Module):
    """The trainable low-rank pair (and DoRA's magnitude). Parameter names match PEFT's:
    lora_A.weight, lora_B.weight, lora_magnitude_vector."""

    def __init__(self, in_features: int, out_features: int, config: LoraConfig) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, config.r, bias=False)  # (r, in)
        self.lora_B = nn.Linear(config.r, out_features, bias=False)  # (out, r)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scale = config.scale
        if config.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / config.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # the adapted model starts equal to the base
        self.lora_magnitude_vector: nn.Parameter | None = None  # DoRA only: see init_magnitude

    def init_magnitude(self, weight_out_in: torch.Tensor) -> None:
        """DoRA: m = ‖W + s·B·A‖ per output row, so the layer starts equal to the base."""
        self.lora_magnitude_vector = nn.Parameter(dora.initial_magnitude(
            weight_out_in, self.lora_A.weight, self.lora_B.weight, self.scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if SCALE_AT_RANK:  # the scale multiplies r values a token, not out (nor their gradients)
            return self.lora_B(self.lora_A(self.dropout(x)) * self.scale)
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scale


# scale·B·(A·x) rather than (B·(A·x))·scale: the same number for a power-of-two scale (alpha = 2r),
# within rounding otherwise, for an elementwise pass over r values a token instead of out.
SCALE_AT_RANK = True

# Under autocast the base product and the side path would each cast the same fp32 input to bf16,
# keep their own bf16 copy for backward and each send an fp32 gradient back to be summed: cast
# once, share it (the products see the same bf16 values; x's two gradients are summed in bf16).
CAST_INPUT_ONCE = True


def _cast_for_autocast(x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
    if type(base_layer) is not nn.Linear:
        return x  # quantized or Conv1D bases keep their own input handling
    dtype = torch.get_autocast_dtype(x.device.type)
    return x.to(dtype) if x.dtype == torch.float32 and dtype != torch.float32 else x


class LoraLayer(DeltaLayer):
    """A linear layer with named LoRA deltas; `merged` names the delta folded into the weight."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.merged: str | None = None
        self.transposed = _is_conv1d(base_layer)
        # One adapter name (or None: the base alone) per batch row while inside
        # deltatune.mixed_adapters(); None outside it (then `active` applies to every row).
        self.row_adapters: tuple[str | None, ...] | None = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None:
            out = self.base_layer(x, *args, **kwargs)
            return out + self._mixed_delta(x, out)
        delta = self.active_delta()
        if delta is None or self.merged == self.active:
            return self.base_layer(x, *args, **kwargs)
        if delta.lora_magnitude_vector is not None:
            out = self.base_layer(x, *args, **kwargs)
            lora_x = x.to(delta.lora_A.weight.dtype) if not torch.is_autocast_enabled() else x
            return dora.dora_output(delta, lora_x, out, self.base_layer, self.transposed).to(out.dtype)
        if CAST_INPUT_ONCE and torch.is_autocast_enabled(x.device.type):
            x = _cast_for_autocast(x, self.base_layer)
            return self.base_layer(x, *args, **kwargs) + delta(x)  # both in autocast's dtype
        out = self.base_layer(x, *args, **kwargs)
        lora_x = x.to(delta.lora_A.weight.dtype) if not torch.is_autocast_enabled() else x
        return out + delta(lora_x).to(out.dtype)

    def _update(self, delta: LoraDelta, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What `delta` adds to the base output `out` of these rows `x` (LoRA or DoRA)."""
        lora_x = x.to(delta.lora_A.weight.dtype) if not torch.is_autocast_enabled() else x
        if delta.lora_magnitude_vector is None:
            return delta(lora_x).to(out.dtype)
        return dora.dora_output(delta, lora_x, out, self.base_layer, self.transposed).to(out.dtype) - out

    def _mixed_delta(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Each row of the batch gets its own adapter's update (None: the base alone)."""
        return lora_rows.mixed_update(self, x, out)

    def delta_weight(self, name: str) -> torch.Tensor:
        d = self.deltas[name]
        return delta_weight(d.lora_A.weight, d.lora_B.weight, d.scale, self.transposed)

    def merge(self) -> None:
        if self.active is None or self.merged is not None:
            return
        delta = self.deltas[self.active]
        with torch.no_grad():
            if delta.lora_magnitude_vector is None:
                merge_into(self.base_layer.weight, self.delta_weight(self.active))
            else:
                self.dora_factor = dora.merge_dora(self.base_layer.weight, delta,
                                                   self.delta_weight(self.active), self.transposed)
        self.merged = self.active

    def unmerge(self) -> None:
        if self.merged is None:
            return
        with torch.no_grad():
            if self.deltas[self.merged].lora_magnitude_vector is None:
                unmerge_from(self.base_layer.weight, self.delta_weight(self.merged))
            else:
                dora.unmerge_dora(self.base_layer.weight, self.dora_factor, self.delta_weight(self.merged))
                self.dora_factor = None
        self.merged = None


# ------------------------------------------------------------------ targeting and apply
def _inside_layers(path: str, model: nn.Module) -> bool:
    from deltatune.models import architecture_of

    return any(path.startswith(p + ".") for p in architecture_of(model).layers)


def _named(path: str, names: list[str] | str) -> bool:
    """peft's rule: a regex fully matches the path; a name is the path or its last components."""
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(path == t or path.endswith("." + t) for t in names)


def _matches(path: str, target_modules: list[str] | str, model: nn.Module) -> bool:
    if target_modules == "all-linear":
        return _inside_layers(path, model)
    return _named(path, target_modules)


def find_targets(model: nn.Module, target_modules: list[str] | str,
                 exclude_modules: list[str] | str | None = None) -> list[str]:
    """Paths of the linear modules LoRA wraps (or already wrapped, for a second adapter);
    never a head, never a delta's own layers, never another method's wrapper."""
    paths = []
    for path, module in model.named_modules():
        if ".deltas." in path or path.endswith(".base_layer"):
            continue
        if not (isinstance(module, (nn.Linear, LoraLayer)) or _is_conv1d(module)):
            continue
        if _matches(path, target_modules, model) and not (exclude_modules and _named(path, exclude_modules)):
            paths.append(path)
    return paths


def apply_lora(model: nn.Module, config: LoraConfig, name: str) -> None:
    targets = find_targets(model, config.target_modules, config.exclude_modules)
    if not targets:
        raise DeltatuneError(
            f"LoraConfig.target_modules: {config.target_modules!r} matched no linear module "
            f"(some that exist: {module_names_hint(model)})")
    lora_init.check_targets(model, targets, config.init)
    dense = lora_init.DenseWeights(model) if config.init == "loftq" else None
    for path in targets:
        module = model.get_submodule(path)
        if not isinstance(module, LoraLayer):
            module = LoraLayer(module)
            set_parent(model, path, module)
        lora_init.check_can_join(module, path, name, config)
        in_f, out_f = in_out_features(module.base_layer)
        delta = LoraDelta(in_f, out_f, config).to(module.base_layer.weight.device)
        if module.base_layer.weight.dtype == torch.float64:
            delta = delta.double()
        lora_init.initialise(model, path, module, delta, config, dense)
        if config.use_dora:
            delta.init_magnitude(dora.weight_out_in(module.base_layer, module.transposed))
        module.add_delta(name, delta)


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [layer for _, layer in delta_layers(model) if isinstance(layer, LoraLayer)]


def merge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model):
        layer.unmerge()


def base_module_paths(model: nn.Module) -> list[str]:
    """Every module path as the bare base model has it: a DeltaLayer stands for the module it
    wraps (its base_layer's children appear under its own path), and its deltas are not there."""
    paths = []

    def walk(module: nn.Module, prefix: str) -> None:
        while isinstance(module, DeltaLayer):
            module = module.base_layer
        for child_name, child in module.named_children():
            path = f"{prefix}.{child_name}" if prefix else child_name
            paths.append(path)
            walk(child, path)

    walk(model, "")
    return paths


def short_targets(model: nn.Module, wrapped: list[str]) -> tuple[list[str], list[str] | None]:
    """(target_modules, exclude_modules) as peft writes them, selecting exactly `wrapped` on the
    bare base: the distinct last path components of the wrapped modules, and for each other module
    those names match (BERT's pooler.dense beside its layers' dense), its shortest path suffix that
    names no wrapped module."""
    names = sorted({path.rpartition(".")[2] for path in wrapped})
    chosen = set(wrapped)
    exclude = []
    for path in base_module_paths(model):
        if path in chosen or not _named(path, names):
            continue
        parts = path.split(".")
        suffixes = (".".join(parts[-k:]) for k in range(1, len(parts) + 1))
        exclude.append(next((s for s in suffixes if not any(_named(w, [s]) for w in wrapped)), path))
    return names, (sorted(set(exclude)) or None)


def lora_to_peft(config: LoraConfig, model: nn.Module, name: str) -> dict:
    targets, exclude = config.target_modules, config.exclude_modules
    if isinstance(targets, str):
        # Save the exact set we wrapped so PEFT (whose "all-linear" differs) wraps the same.
        paths = sorted({p for p, l in delta_layers(model) if isinstance(l, LoraLayer) and name in l.deltas})
        if targets == "all-linear":  # peft's own form: short names, and the few exceptions
            targets, exclude = short_targets(model, paths)
        else:
            targets = "^(" + "|".join(re.escape(p) for p in paths) + ")$"
    any_conv1d = any(l.transposed for l in lora_layers(model))
    return {"r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
            "target_modules": targets, "exclude_modules": exclude,
            "use_rslora": config.use_rslora, "bias": "none",
            "fan_in_fan_out": any_conv1d, "use_dora": config.use_dora,
            **lora_init.init_to_peft(config)}


def lora_from_peft(values: dict) -> LoraConfig:
    unsupported = [k for k in ("lora_bias",) if values.get(k)]
    if unsupported or values.get("bias", "none") != "none":
        raise DeltatuneError(f"adapter_config.json: LoRA options {unsupported or ['bias']} are not supported")
    if values.get("rank_pattern") or values.get("alpha_pattern"):
        raise DeltatuneError("adapter_config.json: per-module rank_pattern/alpha_pattern is not supported")
    targets, exclude = values.get("target_modules"), values.get("exclude_modules")
    if isinstance(targets, (set, tuple)):
        targets = list(targets)
    if isinstance(exclude, (set, tuple)):
        exclude = list(exclude)
    return LoraConfig(r=values["r"], alpha=values.get("lora_alpha", 8),
                      dropout=values.get("lora_dropout", 0.0), target_modules=targets,
                      exclude_modules=exclude or None,
                      use_rslora=bool(values.get("use_rslora", False)),
                      use_dora=bool(values.get("use_dora", False)),
                      **lora_init.init_from_peft(values),
                      modules_to_save=values.get("modules_to_save"))


def loraplus_multipliers(config: LoraConfig, train) -> "Callable[[str, nn.Parameter], float] | None":
    """LoRA+ (Hayou et al. 2024): B learns `train.loraplus_lr_ratio` times faster than A. As
    PEFT's create_loraplus_optimizer groups them, every vector (DoRA's magnitude, biases) goes
    with B."""
    if (ratio := getattr(train, "loraplus_lr_ratio", None)) is None:
        return None
    return lambda name, param: ratio if ".lora_B." in name or param.ndim == 1 else 1.0


from deltatune.methods import Method  # noqa: E402  (the registry imports this module)

METHOD = Method(name="lora", config=LoraConfig, apply=apply_lora, to_peft=lora_to_peft,
                from_peft=lora_from_peft, merge=merge_lora, unmerge=unmerge_lora,
                export_form=lora_init.converted_for_export, import_form=lora_init.converted_on_load,
                lr_multipliers=loraplus_multipliers, train_options=("loraplus_lr_ratio",),
                default_lr=1e-3,  # with alpha = 2r; SST-2/MiniLM all-linear r=8: 84.4% in one pass
                variants={"dora": {"use_dora": True}}, search_space={"r": [4, 8, 16, 32], "alpha": (4, 64, "log")})
