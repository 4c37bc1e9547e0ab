"""Back to dense: a quantized base's weights as the float matrices it computes with, for merging
(a 4-bit weight cannot absorb a small delta without rounding it away) and for measuring the
quantization error against the original checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deltatune.quantization.layers import import_bitsandbytes, is_quantized_linear


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
