"""Loading a quantized base: the BitsAndBytesConfig transformers quantizes with while it streams
the checkpoint, which linears stay dense, and what each 4-bit layer does on this machine.

Only the linear projections inside the transformer layers are quantized; embeddings, norms and
task heads (lm_head, classifier, score, pooler) stay dense. models.load_model drives these steps.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.quantization.compute import compute_through_one_buffer
from deltatune.quantization.config import COMPUTE_DTYPES, QuantizationConfig
from deltatune.quantization.layers import import_bitsandbytes, is_quantized_linear


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
    On CPU each layer dequantizes into one reused buffer (compute.py says why)."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.compute_dtype = COMPUTE_DTYPES[quantization.compute_dtype]
            compute_through_one_buffer(module)
            module.register_forward_hook(_autocast_output)


def _autocast_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
    if torch.is_autocast_enabled(device := output.device.type) and output.dtype == torch.float32:
        return output.to(torch.get_autocast_dtype(device))  # the bf16 matmul's values, exactly
    return None


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
