"""Bottleneck adapters: small residual MLPs inserted inside every transformer layer.

    adapter(h) = scaling · W_up · act(W_down · dropout(h) + b_down) + b_up
    W_down: (bottleneck, hidden), W_up: (hidden, bottleneck), W_up = b_up = 0 at start

Placements (where the adapter reads and where its output is added):
    houlsby  (Houlsby et al. 2019)  h ← h + adapter(h) after the attention output projection and
                                    again after the feed-forward output projection (sequential)
    pfeiffer (Pfeiffer et al. 2021) the same, after the feed-forward output projection only
    parallel (He et al. 2022)       ffn_out ← ffn(x) + adapter(x), reading the feed-forward
                                    block's input x, beside the block rather than after it

The nonlinearity between the projections means the adapter's effect depends on its input, so
unlike LoRA it can never be folded into the base weights: there is no merge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.methods.base import DeltaLayer, MethodConfig, delta_layers

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh}
DEFAULT_REDUCTION_FACTOR = 16  # bottleneck = hidden / 16 when neither size is given (AdapterHub's)

# Where a bottleneck reads its input from, relative to the module its AdapterLayer wraps.
READS_OUTPUT = "output"          # sequential: added to the wrapped module's own output
READS_INPUT = "input"            # parallel, the wrapped module is the whole feed-forward block
READS_FFN_INPUT = "ffn_input"    # parallel, input captured by a pre-hook on another module


@dataclass
class AdapterConfig(MethodConfig):
    method = "adapter"
    peft_type = "BOTTLENECK_ADAPTER"  # ours: PEFT has no bottleneck adapters; same file layout

    placement: str = "houlsby"           # houlsby | pfeiffer | parallel (see the module docstring)
    # Width of the bottleneck. Give at most one of the two; neither means hidden / 16.
    bottleneck_size: int | None = None
    reduction_factor: int | None = None  # bottleneck = hidden // reduction_factor
    activation: str = "relu"             # relu | gelu | silu (= swish) | tanh
    layers: list[int] | None = None      # transformer layer indices to adapt; None: all of them
    dropout: float = 0.0                 # dropout on the adapter's input (the base path is untouched)
    scaling: float = 1.0                 # multiplies the adapter output; He et al. use 4 for parallel

    def validate(self) -> None:
        super().validate()
        if self.placement not in PLACEMENTS:
            self.fail("placement", f"must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            self.fail("bottleneck_size", "give bottleneck_size or reduction_factor, not both")
        for name in ("bottleneck_size", "reduction_factor"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                self.fail(name, f"must be a positive integer, got {value!r}")
        if self.activation not in ACTIVATIONS:
            self.fail("activation", f"must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.layers is not None:
            if not (isinstance(self.layers, list) and self.layers and all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers)):
                self.fail("layers", f"must be a non-empty list of layer indices >= 0, got {self.layers!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            self.fail("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            self.fail("scaling", f"must be a number, got {self.scaling!r}")

    def bottleneck_for(self, hidden_size: int) -> int:
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, hidden_size // (self.reduction_factor or DEFAULT_REDUCTION_FACTOR))


# ------------------------------------------------------------------ modules
class Bottleneck(nn.Module):
    """down-projection -> nonlinearity -> up-projection; returns only the residual branch."""

    def __init__(self, hidden_size: int, config: AdapterConfig, reads: str) -> None:
        super().__init__()
        bottleneck = config.bottleneck_for(hidden_size)
        self.adapter_down = nn.Linear(hidden_size, bottleneck)  # (bottleneck, hidden)
        self.activation = ACTIVATIONS[config.activation]()
        self.adapter_up = nn.Linear(bottleneck, hidden_size)    # (hidden, bottleneck)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = float(config.scaling)
        self.reads = reads
        # Zero up-projection: the branch outputs exactly 0, so the adapted model starts as the base.
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (batch, seq, hidden)
        return self.adapter_up(self.activation(self.adapter_down(self.dropout(hidden)))) * self.scaling


class Mailbox:
    """Hands the feed-forward input from an InputCapture to the AdapterLayer of the same layer.

    A plain object, not a module, so sharing it between the two adds nothing to the state dict.
    """

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None


class AdapterLayer(DeltaLayer):
    """A module (a projection, or a whole feed-forward block) with named bottleneck deltas.

    Each delta says where it reads (`Bottleneck.reads`); whichever reads, its output is added to
    the wrapped module's output. One class serves every placement, so two named adapters with
    different placements that land on the same module share one wrapper (and stable key paths).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.mailbox: Mailbox | None = None  # set when a delta reads READS_FFN_INPUT

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(x, *args, **kwargs)
        delta = self.active_delta()
        if delta is None:
            return out
        if delta.reads == READS_OUTPUT:
            source = out
        elif delta.reads == READS_INPUT:
            source = x
        else:
            source, self.mailbox.tensor = self.mailbox.tensor, None  # don't keep it alive
            if source is None:
                raise DeltatuneError("parallel adapter: the feed-forward input was not captured "
                                     "(the ffn_input module did not run before ffn_output)")
        weight = delta.adapter_down.weight
        if not torch.is_autocast_enabled(source.device.type):  # (the no-argument form is CUDA's)
            source = source.to(weight.dtype)  # e.g. bf16 base, fp32 adapter
        return out + delta(source).to(out.dtype)


class InputCapture(DeltaLayer):
    """Wraps the `ffn_input` module where it is not the whole feed-forward block (BERT's
    `intermediate`): posts its input to the mailbox for the parallel adapter further on.

    Its deltas are empty markers, one per adapter name that needs the capture, so switching,
    disabling and deleting go through the shared DeltaLayer mechanism like everything else.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.mailbox = Mailbox()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.active_delta() is not None:
            self.mailbox.tensor = x
        return self.base_layer(x, *args, **kwargs)


# ------------------------------------------------------------------ placement and apply
def _unwrapped(module: nn.Module) -> nn.Module:
    while isinstance(module, DeltaLayer):
        module = module.base_layer
    return module


def _out_features(module: nn.Module, where: str) -> int:
    module = _unwrapped(module)
    # nn.Linear has out_features; transformers' Conv1D (GPT-2) keeps it as `nf`.
    size = getattr(module, "out_features", None) or getattr(module, "nf", None)
    if not isinstance(size, int):
        raise DeltatuneError(f"adapter: cannot tell the output width of {where} "
                             f"({type(module).__name__}); expected a linear projection")
    return size


def _submodule(layer: nn.Module, path: str, where: str) -> nn.Module:
    """`path` inside one transformer layer, looking through wrappers other methods put there."""
    module = layer
    for part in path.split("."):
        while not hasattr(module, part) and isinstance(module, DeltaLayer):
            module = module.base_layer
        if not hasattr(module, part):
            raise DeltatuneError(f"adapter: {where} has no submodule {path!r} "
                                 "(check the architecture entry in deltatune.models)")
        module = getattr(module, part)
    return module


def _wrap(layer: nn.Module, path: str, where: str, kind: type[DeltaLayer] = AdapterLayer) -> Any:
    """The `kind` wrapper at `path` in `layer`, created around the existing module if needed."""
    module = _submodule(layer, path, where)
    if isinstance(module, kind):
        return module
    wrapper = kind(module)
    parent_path, _, child = path.rpartition(".")
    parent = _submodule(layer, parent_path, where) if parent_path else layer
    while not hasattr(parent, child) and isinstance(parent, DeltaLayer):
        parent = parent.base_layer  # e.g. Llama's `mlp` already wrapped by a parallel adapter
    setattr(parent, child, wrapper)
    return wrapper


def _add(wrapper: AdapterLayer, name: str, hidden: int, config: AdapterConfig, reads: str) -> None:
    reference = next(_unwrapped(wrapper.base_layer).parameters())
    dtype = torch.float64 if reference.dtype == torch.float64 else torch.float32
    delta = Bottleneck(hidden, config, reads).to(device=reference.device, dtype=dtype)
    wrapper.add_delta(name, delta)


def _chosen_layers(model: nn.Module, config: AdapterConfig) -> list[tuple[int, nn.Module]]:
    from deltatune.models import transformer_layers

    layers = transformer_layers(model)
    indices = config.layers if config.layers is not None else range(len(layers))
    for index in indices:
        if index >= len(layers):
            raise DeltatuneError(f"AdapterConfig.layers: index {index} is out of range; this model "
                                 f"has {len(layers)} layers (0-{len(layers) - 1})")
    return [(i, layers[i]) for i in sorted(set(indices))]


def _add_parallel(layer: nn.Module, name: str, config: AdapterConfig, arch: Any, where: str) -> None:
    """Beside the feed-forward block: ffn_out ← ffn(x) + scaling · adapter(x).

    Generic over the architecture facts: when `ffn_output` lies inside `ffn_input` (Llama's and
    GPT-2's `mlp`), `ffn_input` is the whole block, so one wrapper around it reads its own input
    and adds to its own output. Otherwise (BERT: `intermediate` in, `output.dense` out, two
    siblings and no module holding just the FFN) the adapter wraps `ffn_output`, and an
    InputCapture around `ffn_input` hands it the block's input through a shared Mailbox. (A
    forward pre-hook would do the same, but would outlive delete_adapter; a wrapper is removed
    by the shared mechanism when its last delta goes.)
    """
    hidden = _out_features(_submodule(layer, arch.ffn_output, where), f"{where}.{arch.ffn_output}")
    if arch.ffn_output.startswith(arch.ffn_input + "."):
        _add(_wrap(layer, arch.ffn_input, where), name, hidden, config, READS_INPUT)
        return
    capture = _wrap(layer, arch.ffn_input, where, InputCapture)
    capture.add_delta(name, nn.Module())  # an empty marker: "capture while `name` is active"
    wrapper = _wrap(layer, arch.ffn_output, where)
    wrapper.mailbox = capture.mailbox
    _add(wrapper, name, hidden, config, READS_FFN_INPUT)


def apply_adapter(model: nn.Module, config: AdapterConfig, name: str) -> None:
    from deltatune.models import architecture_of

    arch = architecture_of(model)
    for index, layer in _chosen_layers(model, config):
        where = f"layer {index}"
        if config.placement == "parallel":
            _add_parallel(layer, name, config, arch, where)
            continue
        paths = [arch.ffn_output] if config.placement == "pfeiffer" else [arch.attention_output, arch.ffn_output]
        for path in paths:
            wrapper = _wrap(layer, path, where)
            hidden = _out_features(wrapper.base_layer, f"{where}.{path}")
            _add(wrapper, name, hidden, config, READS_OUTPUT)


def adapter_layers(model: nn.Module) -> list[AdapterLayer]:
    return [layer for _, layer in delta_layers(model) if isinstance(layer, AdapterLayer)]


# ------------------------------------------------------------------ adapter_config.json
_SAVED_FIELDS = ("placement", "bottleneck_size", "reduction_factor", "activation", "layers",
                 "dropout", "scaling")


def adapter_to_peft(config: AdapterConfig, model: nn.Module, name: str) -> dict:
    return {field: getattr(config, field) for field in _SAVED_FIELDS}


def adapter_from_peft(values: dict) -> AdapterConfig:
    options = {field: values[field] for field in _SAVED_FIELDS if field in values}
    return AdapterConfig(**options, modules_to_save=values.get("modules_to_save"))


from deltatune.methods import Method  # noqa: E402  (the registry imports this module)

METHOD = Method(
    name="adapter", config=AdapterConfig, apply=apply_adapter,
    to_peft=adapter_to_peft, from_peft=adapter_from_peft,
    why_no_merge="a bottleneck adapter has a nonlinearity between its down- and up-projection, "
                 "so its effect depends on the input and cannot be folded into the base weights; "
                 "keep the adapter separate (load_adapter) or use LoRA if you need a merged model",
    default_lr=1e-3,
    search_space={"bottleneck_size": [8, 16, 32, 64, 128]},
)
