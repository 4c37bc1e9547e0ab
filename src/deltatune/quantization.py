"""A quantized frozen base (QLoRA, Dettmers et al. 2023) through bitsandbytes.

    model, tok = load_model("smollm2-135m", quantize="nf4")     # or fp4 | int8 | none

Only the linear projections inside the transformer layers are quantized; embeddings, norms and
task heads (lm_head, classifier, score, pooler) stay dense. The quantization happens while
transformers streams the checkpoint from disk, so the dense weights are never all copied into
memory; a checkpoint saved quantized loads as it is. A model built in memory (a tiny test model)
is saved and reloaded first: quantizing in place would need the dense model resident.

The deltas never see a quantized weight: LoRA adds its update to the quantized layer's output,
adapters and the prompt methods sit outside the linears. Only merging touches the weights, via
`dequantize_model` (a 4-bit weight cannot absorb a small delta without rounding it away).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.errors import DeltatuneError

TYPES = ("nf4", "fp4", "int8")
COMPUTE_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32,
                  "float16": torch.float16}
SIDECAR = "base_quantization.json"  # beside adapter_config.json: how the base was quantized


@dataclass(frozen=True)
class QuantizationConfig:
    type: str = "nf4"            # nf4 (QLoRA's, best for normally distributed weights) | fp4 | int8
    double_quant: bool = True    # 4-bit: quantize the per-block scales too (~0.4 bit/param less)
    # 4-bit: the dtype each layer dequantizes into for its matmul. auto: bf16 where bf16 matmuls
    # are fast (CUDA, CPUs with AMX tiles), else fp32 (on AVX2-only CPUs bf16 is emulated).
    compute_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise DeltatuneError(f"quantize: unknown type {self.type!r} (one of none, {', '.join(TYPES)})")
        if not isinstance(self.double_quant, bool):
            raise DeltatuneError(f"quantize.double_quant: must be true or false, got {self.double_quant!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise DeltatuneError(f"quantize.compute_dtype: must be one of {', '.join(COMPUTE_DTYPES)}, "
                                 f"got {self.compute_dtype!r}")

    @property
    def bits(self) -> int:
        return 8 if self.type == "int8" else 4

    def resolved(self, device: torch.device | None = None) -> "QuantizationConfig":
        """`compute_dtype: auto` replaced by what this machine uses (what a run records)."""
        if self.compute_dtype != "auto":
            return self
        from deltatune.training.optimization import resolve_bf16

        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return dataclasses.replace(self, compute_dtype="bfloat16" if resolve_bf16("auto", device) else "float32")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_quantize(value: Any, where: str = "quantize") -> QuantizationConfig | None:
    """`quantize:` as written in a config or passed to load_model: none | nf4 | fp4 | int8, a
    mapping {type, double_quant, compute_dtype}, or a QuantizationConfig. None means dense."""
    if value is None or value is False or value == "none":
        return None
    if isinstance(value, QuantizationConfig):
        return value
    if isinstance(value, str):
        if value not in TYPES:
            raise DeltatuneError(f"{where}: unknown value {value!r} (one of none, {', '.join(TYPES)})")
        return QuantizationConfig(type=value)
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(QuantizationConfig)}
        for key in value:
            if key not in known:
                raise DeltatuneError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
        if value.get("type", "nf4") == "none":
            return None
        return QuantizationConfig(**value)
    raise DeltatuneError(f"{where}: expected none, {', '.join(TYPES)} or a mapping, got {value!r}")


def stored_quantization(config: Any, name: str, requested: QuantizationConfig | None) -> QuantizationConfig | None:
    """How a checkpoint saved quantized by bitsandbytes (a QLoRA base's save_pretrained, a *-bnb-4bit
    model) stores its codes (None: dense). `requested` may repeat its type, never ask for another."""
    stored = getattr(config, "quantization_config", None)
    values = stored if isinstance(stored, dict) or stored is None else stored.to_dict()
    if not values or values.get("quant_method") != "bitsandbytes":
        return None
    found = (QuantizationConfig(type="int8") if values.get("load_in_8bit") or values.get("_load_in_8bit") else
             QuantizationConfig(type=values.get("bnb_4bit_quant_type", "fp4"),
                                double_quant=bool(values.get("bnb_4bit_use_double_quant", False))))
    if requested is None:
        return found
    if requested.type != found.type:
        raise DeltatuneError(f"quantize: {name} is already quantized as {found.type}; it cannot load "
                             f"as {requested.type} (use quantize: {found.type}, or its dense checkpoint)")
    return dataclasses.replace(found, compute_dtype=requested.compute_dtype)


def follow_this_machine(model: nn.Module, quantization: QuantizationConfig) -> None:
    """Each 4-bit layer computes in the dtype resolved for this machine (not the one a saved
    quantized checkpoint names) and, under autocast, returns the autocast dtype as a dense
    nn.Linear does. bitsandbytes casts its output back to the input's dtype, so on an fp32 base
    all that follows each projection (LoRA's sum, the MLP's products, what backward keeps)
    stayed fp32: SmolLM2's QLoRA peaked above its LoRA (6.46 vs 5.12 GB; now 5.15 vs 6.00).
    On CPU each layer dequantizes into one reused buffer (quantized_compute.py says why)."""
    from deltatune.quantized_compute import compute_through_one_buffer

    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.compute_dtype = COMPUTE_DTYPES[quantization.compute_dtype]
            compute_through_one_buffer(module)
            module.register_forward_hook(_autocast_output)


def _autocast_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
    if torch.is_autocast_enabled(device := output.device.type) and output.dtype == torch.float32:
        return output.to(torch.get_autocast_dtype(device))  # the bf16 matmul's values, exactly
    return None


def import_bitsandbytes():
    """bitsandbytes, imported quietly: on AVX512-bf16 CPUs it (and the `kernels` package it loads a
    Hub kernel through) logs warnings on import, which would otherwise sit above every one-line error."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # bitsandbytes' CPU ops look up a Hub kernel through the `kernels` package, which warns on
    # every load that it "skips the publisher trust check" offline: noise above deltatune's lines
    logging.getLogger("kernels").setLevel(logging.ERROR)
    # int8 on CPU: "inputs will be cast from float32 to float16", once per layer per call
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    try:
        import bitsandbytes
    except ImportError:
        raise DeltatuneError("quantize: needs the bitsandbytes package (pip install 'bitsandbytes>=0.45')") from None
    return bitsandbytes


# ------------------------------------------------------------------ loading
def dense_module_names(model_class: type, config: Any, layer_paths: tuple[str, ...]) -> tuple[list[str], int]:
    """(paths of the linear modules outside the transformer layers, number inside them), read
    off the model built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        skeleton = model_class.from_config(config)
    outside, inside = [], 0
    for path, module in skeleton.named_modules():
        if not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
            continue
        if any(path.startswith(p + ".") for p in layer_paths):
            inside += 1
        else:
            outside.append(path)
    return outside, inside


def bitsandbytes_config(quantization: QuantizationConfig, keep_dense: list[str]):
    """transformers' BitsAndBytesConfig for `quantization`, keeping `keep_dense` unquantized."""
    from transformers import BitsAndBytesConfig

    import_bitsandbytes()
    if quantization.type == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep_dense)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quantization.type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=COMPUTE_DTYPES[quantization.compute_dtype],
        llm_int8_skip_modules=keep_dense)


def device_map() -> dict | str:
    # bitsandbytes quantizes while the weights are placed; on CUDA they go to GPU 0.
    return {"": 0} if torch.cuda.is_available() else "cpu"


def keep_one_weight_layout(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights on CPUs with AVX512-bf16: there the first
    no-grad eval forward rewrites each Linear4bit's weight in place into a bf16 inference layout
    (scales rounded, double quantization undone) whose kernel has no backward, so an evaluation
    mid-training would change the outputs and cut every delta's gradient beneath the layer."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False


def own_weights(model: nn.Module, codes_too: bool = False) -> None:
    """Copy the dense weights (embeddings, norms, heads) off the checkpoint's memory map: left
    there (transformers does when the dtype matches) they keep the whole file mapped, and every
    page read while quantizing stays resident (1.9 GB of a 1B model's 2.5 GB file, measured).
    `codes_too` (a checkpoint saved quantized): the codes and their scales as well, since any
    one tensor left on the map keeps all of it mapped, the dense pages already read included."""
    owned: dict[tuple, torch.Tensor] = {}

    def own(tensor: torch.Tensor) -> torch.Tensor:  # one copy per storage view (int8: CB is the data)
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key not in owned:
            owned[key] = tensor.clone()
        return owned[key]

    with torch.no_grad():
        for module in model.modules():
            quantized = is_quantized_linear(module)
            if quantized and not codes_too:
                continue
            for param in module.parameters(recurse=False):
                param.data = own(param.data)
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = own(buffer)  # keeps the buffer's persistence
            state = getattr(module.weight, "quant_state", None) if quantized else None
            for holder in ((module.weight, getattr(module, "state", None), state,
                            getattr(state, "state2", None)) if quantized else ()):
                for name in ("CB", "SCB", "absmax", "code", "offset"):
                    if torch.is_tensor(vars(holder).get(name) if holder is not None else None):
                        setattr(holder, name, own(getattr(holder, name)))


def use_inference_kernel(model: nn.Module) -> None:
    """For processes that only generate (`generate`, `serve`): let bitsandbytes use its CPU
    inference kernel, ~10x faster per token than dequantizing each layer (4 vs 39 ms for a
    576x1536 layer here). Never for a model that will train (see keep_one_weight_layout)."""
    if not any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        return
    fast = bool(import_bitsandbytes().functional.has_avx512bf16())
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = fast


# ------------------------------------------------------------------ what a model carries
def is_quantized_linear(module: nn.Module) -> bool:
    name = type(module).__name__
    return name in ("Linear4bit", "Linear8bitLt") and type(module).__module__.startswith("bitsandbytes")


def quantization_of(model: nn.Module) -> QuantizationConfig | None:
    """The quantization `model` was loaded with (None: a dense base)."""
    return getattr(model, "deltatune_quantization", None)


def is_quantized(model: nn.Module) -> bool:
    return quantization_of(model) is not None or any(is_quantized_linear(m) for m in model.modules())


def describe(model: nn.Module) -> str:
    return q.type if (q := quantization_of(model)) is not None else "quantized"


# ------------------------------------------------------------------ back to dense
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The dense (out, in) weight a bitsandbytes linear computes with, in fp32."""
    bnb = import_bitsandbytes()
    weight = module.weight
    if type(module).__name__ == "Linear4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = module.state.SCB
    # int8: each row is stored as round(127 · w / max|w_row|) with its max in SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()


def dequantize_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    weight = dequantized_weight(module)
    dense = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None,
                      device=weight.device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if module.bias is not None:
            dense.bias.copy_(module.bias)
    return dense


def dequantize_model(model: nn.Module) -> int:
    """Replace every bitsandbytes linear (also inside deltatune's wrappers) by a dense nn.Linear
    in the dtype of the model's embeddings; the model then saves as a plain transformers model.
    Returns the number of layers dequantized."""
    dtype = model.get_input_embeddings().weight.dtype
    count = 0
    for path, module in list(model.named_modules()):
        if is_quantized_linear(module):
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, dequantize_linear(module, dtype))
            count += 1
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.deltatune_quantization = None
    return count


def quantization_error(model: nn.Module, model_dir: str | Path) -> tuple[float, int] | None:
    """(relative error ||W_q - W|| / ||W|| over every quantized weight, number of weights): the
    quantized base measured against the dense weights in `model_dir`'s safetensors files, or
    None when those files are not at hand (a Hub id)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else []
    where = {}
    for file in files:
        with safe_open(str(file), "pt") as handle:
            where.update({key: file for key in handle.keys()})
    squared_error = squared_norm = 0.0
    count = 0
    for path, module in model.named_modules():
        if not is_quantized_linear(module):
            continue
        key = path.replace(".base_layer", "") + ".weight"  # deltatune's wrappers add base_layer
        if key not in where:
            return None
        with safe_open(str(where[key]), "pt") as handle:
            original = handle.get_tensor(key).float()
        squared_error += (dequantized_weight(module) - original).square().sum().item()
        squared_norm += original.square().sum().item()
        count += 1
    return ((squared_error / squared_norm) ** 0.5, count) if count else None


# ------------------------------------------------------------------ the record beside an adapter
def write_record(model: nn.Module, directory: Path) -> None:
    """Record the base's quantization beside a saved adapter, so merge/eval/generate/serve
    rebuild the same base without a flag. A sidecar file, not a key in adapter_config.json:
    PEFT warns about keys it does not know ("saved by a newer version"), which would mislead."""
    q = quantization_of(model)
    if q is not None:
        (directory / SIDECAR).write_text(json.dumps(q.to_dict(), indent=2, sort_keys=True) + "\n")


def recorded_quantization(adapter_dir: str | Path | None) -> QuantizationConfig | None:
    """The quantization an adapter (or run) directory was trained on; None when dense or absent."""
    if adapter_dir is None:
        return None
    path = Path(adapter_dir) / SIDECAR
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeltatuneError(f"{path}: not valid JSON ({exc})") from None
    return parse_quantize(values, where=str(path))


def shared_quantization(adapter_dirs: dict[str, Any]) -> QuantizationConfig | None:
    """The one base quantization several adapters served together were trained on; adapters
    trained on different bases cannot share one loaded base (one line naming two of them)."""
    found = {name: recorded_quantization(d) for name, d in adapter_dirs.items()}
    first_name, first = next(iter(found.items()), (None, None))
    for name, q in found.items():
        if q != first:
            label = {n: (v.type if v is not None else "a dense base") for n, v in found.items()}
            raise DeltatuneError(f"--adapter {first_name} was trained on {label[first_name]} but "
                                 f"--adapter {name} on {label[name]}: serve them separately")
    return first
