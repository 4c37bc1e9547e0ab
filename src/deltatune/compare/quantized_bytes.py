"""What a base's weights take in bytes, dense or quantized by bitsandbytes: predicted from its
shapes alone (what `plan` charges a base too big to load here) and counted on a loaded model."""
from __future__ import annotations

import torch
from torch import nn

from deltatune.quantization import QuantizationConfig, is_quantized_linear

BLOCK = 64          # bitsandbytes' 4-bit block: one scale per 64 weights
NESTED_BLOCK = 256  # double quantization: the scales are quantized to 8 bits in blocks of 256


def quantized_weight_bytes(out_features: int, in_features: int, quantization: QuantizationConfig) -> int:
    """Bytes bitsandbytes stores for one (out, in) weight: codes plus their scales."""
    numel = out_features * in_features
    if quantization.type == "int8":
        return numel + 4 * out_features  # int8 codes + one fp32 scale per row
    blocks = -(-numel // BLOCK)
    if quantization.double_quant:  # 8-bit scales + one fp32 scale per 256 of them + 256-entry map
        scales = blocks + 4 * -(-blocks // NESTED_BLOCK) + 4 * 256
    else:
        scales = 4 * blocks
    return -(-numel // 2) + scales + 4 * 16  # two codes per byte; the 16-value code book


def predicted_weight_bytes(model: nn.Module, layer_paths: tuple[str, ...],
                           quantization: QuantizationConfig | None, dtype: torch.dtype) -> int:
    """The bytes a model's weights take once loaded with `quantization` (None: dense), from its
    shapes alone (`model` may live on the meta device): what `plan` predicts for the base."""
    total, seen = 0, set()
    for path, module in model.named_modules():
        inside = any(path.startswith(p + ".") for p in layer_paths)
        quantize = quantization is not None and inside and isinstance(module, nn.Linear)
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if quantize and name == "weight":
                total += quantized_weight_bytes(module.out_features, module.in_features, quantization)
            else:
                total += param.numel() * torch.empty((), dtype=dtype).element_size()
    return total


def stored_weight_bytes(model: nn.Module) -> int:
    """The bytes a loaded model's weights occupy: parameters, buffers, and the scales that
    bitsandbytes keeps beside its codes (which transformers' get_memory_footprint leaves out)."""
    total, seen = 0, set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel() * param.element_size()
            state = getattr(param, "quant_state", None)
            if state is not None:
                total += sum(v.numel() * v.element_size() for v in state.as_dict(packed=True).values()
                             if torch.is_tensor(v))
            scales = getattr(param, "SCB", None)
            if scales is None and name == "weight" and is_quantized_linear(module):
                scales = getattr(getattr(module, "state", None), "SCB", None)
            if scales is not None:
                total += scales.numel() * scales.element_size()
        total += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
    return total
