"""(IA)³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning"): learned vectors that rescale activations, nothing else.

    attention keys/values:  y = (x Wᵀ + b) ⊙ l          l: (out,), starts at 1
    feed-forward output:    y = (x ⊙ l) Wᵀ + b          l: (in,),  starts at 1 (scales the FFN's
                                                              inner activation)

A few thousand parameters per model (~10× fewer than LoRA r=8 on the same layers). Both forms
fold into W (rows, or columns for the feed-forward form) and unfold by dividing again, so a merged
model costs nothing at inference. Each row of a batch can use its own vectors (`mixed_adapters`).
Parameter names and shapes are PEFT's: `ia3_l` (out, 1), or (1, in) for feed-forward modules.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.base import (DeltaLayer, MethodConfig, check_module_names, delta_layers,
                                    module_names_hint, set_parent)
from deltatune.methods.lora_rows import row_groups


@dataclass
class IA3Config(MethodConfig):
    method = "ia3"
    peft_type = "IA3"

    # Module names (matched on the last path components) or a regex (full match on the path).
    # None: PEFT's defaults for the family — the key and value projections plus the feed-forward
    # output (BERT: key, value, output.dense; Llama: k_proj, v_proj, down_proj; GPT-2: c_attn,
    # mlp.c_proj), as in the paper.
    target_modules: list[str] | str | None = None
    # Which targets scale their input (the FFN's inner activation) instead of their output.
    # None: the family's feed-forward output projection; []: none of them.
    feedforward_modules: list[str] | str | None = None

    def validate(self) -> None:
        super().validate()
        check_module_names(self, "target_modules")
        check_module_names(self, "feedforward_modules", allow_empty=True)  # []: no feed-forward form
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                self.fail("feedforward_modules", f"{extra[0]!r} is not in target_modules "
                                                 f"(feed-forward modules are a subset of the targets)")


def _matches(path: str, names: list[str] | str) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(path == n or path.endswith("." + n) for n in names)


def resolved_modules(model: nn.Module, config: IA3Config) -> tuple[list[str] | str, list[str] | str]:
    """(target_modules, feedforward_modules) with the family's defaults filled in."""
    from deltatune.models import architecture_of

    arch = architecture_of(model)
    targets = config.target_modules
    if targets is None:
        targets = [*arch.key_value, arch.ffn_output]
    feedforward = config.feedforward_modules
    if feedforward is None:
        feedforward = [arch.ffn_output]
    return targets, feedforward


# ------------------------------------------------------------------ modules
def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class IA3Delta(nn.Module):
    """One scaling vector, shaped as PEFT stores it: (out, 1), or (1, in) for feed-forward."""

    def __init__(self, size: int, feedforward: bool) -> None:
        super().__init__()
        self.feedforward = feedforward
        self.ia3_l = nn.Parameter(torch.ones((1, size) if feedforward else (size, 1)))

    def vector(self) -> torch.Tensor:
        return self.ia3_l.flatten()


class IA3Layer(DeltaLayer):
    """A linear layer (nn.Linear or GPT-2's Conv1D) with named (IA)³ vectors."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.merged: str | None = None
        self.transposed = _is_conv1d(base_layer)  # Conv1D weight is (in, out)
        self.row_adapters: tuple[str | None, ...] | None = None  # see deltatune.mixed

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None:
            return self._mixed_forward(x, *args, **kwargs)
        delta = self.active_delta()
        if delta is None or self.merged == self.active:
            return self.base_layer(x, *args, **kwargs)
        scale = delta.vector()
        if delta.feedforward:
            return self.base_layer((x * scale).to(x.dtype), *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        return (out * scale).to(out.dtype)

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each row scaled by its own adapter's vector (ones for the base and other layers)."""
        batch = x.shape[0]
        out_features = self.base_layer.weight.shape[1 if self.transposed else 0]
        in_scale = torch.ones(batch, x.shape[-1], dtype=x.dtype, device=x.device)
        out_scale = torch.ones(batch, out_features, dtype=x.dtype, device=x.device)
        for name, rows in row_groups(self.row_adapters, batch, x.device):
            if name in self.deltas:
                delta = self.deltas[name]
                target = in_scale if delta.feedforward else out_scale
                target.index_copy_(0, rows, delta.vector().to(x.dtype).expand(len(rows), -1))
        shape = (batch, *[1] * (x.dim() - 2), -1)  # broadcast over the sequence dimensions
        out = self.base_layer(x * in_scale.view(shape), *args, **kwargs)
        return out * out_scale.view(shape).to(out.dtype)

    def _scale_shape(self, delta: IA3Delta) -> tuple[int, int]:
        """How the vector lines up with the stored weight: rows for outputs, columns for inputs."""
        along_out = not delta.feedforward
        if self.transposed:  # (in, out)
            return (1, -1) if along_out else (-1, 1)
        return (-1, 1) if along_out else (1, -1)

    def merge(self) -> None:
        if self.active is None or self.merged is not None:
            return
        delta = self.deltas[self.active]
        vector = delta.vector().detach()
        if bool((vector == 0).any()):
            raise DeltatuneError(f"cannot merge (IA)³ adapter {self.active!r}: its vector has zero "
                                 f"entries, so unmerging could not divide them out again")
        with torch.no_grad():
            weight = self.base_layer.weight
            weight.mul_(vector.to(weight.dtype).view(self._scale_shape(delta)))
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None and not delta.feedforward:  # output scaling covers the bias too
                bias.mul_(vector.to(bias.dtype))
        self.merged = self.active

    def unmerge(self) -> None:
        if self.merged is None:
            return
        delta = self.deltas[self.merged]
        vector = delta.vector().detach()
        with torch.no_grad():
            weight = self.base_layer.weight
            weight.div_(vector.to(weight.dtype).view(self._scale_shape(delta)))
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None and not delta.feedforward:
                bias.div_(vector.to(bias.dtype))
        self.merged = None


# ------------------------------------------------------------------ apply, merge, PEFT fields
def apply_ia3(model: nn.Module, config: IA3Config, name: str) -> None:
    targets, feedforward = resolved_modules(model, config)
    paths = []
    for path, module in model.named_modules():
        if ".deltas." in path or path.endswith(".base_layer") or not _matches(path, targets):
            continue
        if isinstance(module, DeltaLayer) and not isinstance(module, IA3Layer):
            raise DeltatuneError(f"IA3Config.target_modules: {path} already carries another method's "
                                 f"delta ({type(module).__name__}); (IA)³ cannot share a layer with it")
        if isinstance(module, (nn.Linear, IA3Layer)) or _is_conv1d(module):
            paths.append(path)
    if not paths:
        raise DeltatuneError(f"IA3Config.target_modules: {targets!r} matched no linear module "
                             f"(some that exist: {module_names_hint(model)})")
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, IA3Layer):
            module = IA3Layer(module)
            set_parent(model, path, module)
        is_ff = _matches(path, feedforward)
        weight = module.base_layer.weight
        in_f, out_f = (weight.shape[0], weight.shape[1]) if module.transposed else (weight.shape[1], weight.shape[0])
        delta = IA3Delta(in_f if is_ff else out_f, is_ff).to(device=weight.device)
        if weight.dtype == torch.float64:
            delta = delta.double()
        module.add_delta(name, delta)


def ia3_layers(model: nn.Module) -> list[IA3Layer]:
    return [layer for _, layer in delta_layers(model) if isinstance(layer, IA3Layer)]


def merge_ia3(model: nn.Module) -> None:
    for layer in ia3_layers(model):
        layer.merge()


def unmerge_ia3(model: nn.Module) -> None:
    for layer in ia3_layers(model):
        layer.unmerge()


def ia3_to_peft(config: IA3Config, model: nn.Module, name: str) -> dict:
    targets, feedforward = resolved_modules(model, config)
    if isinstance(targets, list) and isinstance(feedforward, list) and not set(feedforward) <= set(targets):
        # A default feed-forward name beside user targets: PEFT wants a subset of the targets,
        # so name exactly the layers this adapter scales on their input.
        paths = sorted(p for p, l in delta_layers(model) if isinstance(l, IA3Layer)
                       and name in l.deltas and l.deltas[name].feedforward)
        feedforward = "^(" + "|".join(re.escape(p) for p in paths) + ")$" if paths else []
    return {"target_modules": targets, "feedforward_modules": feedforward,
            "fan_in_fan_out": any(l.transposed for l in ia3_layers(model)), "init_ia3_weights": True}


def ia3_from_peft(values: dict) -> IA3Config:
    def as_list(value):
        return list(value) if isinstance(value, (set, tuple)) else value

    return IA3Config(target_modules=as_list(values.get("target_modules")),
                     feedforward_modules=as_list(values.get("feedforward_modules")),
                     modules_to_save=values.get("modules_to_save"))


from deltatune.methods import Method  # noqa: E402  (the registry imports this module)

METHOD = Method(name="ia3", config=IA3Config, apply=apply_ia3, to_peft=ia3_to_peft,
                from_peft=ia3_from_peft, merge=merge_ia3, unmerge=unmerge_ia3,
                # MiniLM/SST-2, 4,000 rows, one epoch: lr 3e-3 73.6%, 1e-2 76.8%, 3e-2 79.7%, 1e-1 77.8%
                default_lr=3e-2)
