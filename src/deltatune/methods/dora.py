"""DoRA (Liu et al. 2024): LoRA on the direction of each output row, a learned magnitude on its size.

    W' = m · (W + s·B·A) / ‖W + s·B·A‖        norm per output row; m: (out,), starts at ‖W‖

so the adapted layer computes, with f = m / ‖W + s·B·A‖ (the norm detached, as the paper's §4.3
and PEFT do, so backward never differentiates through it):

    y = f · (x Wᵀ + s · x Aᵀ Bᵀ) + bias

computed from the base layer's own output (x Wᵀ + bias), so W is multiplied once. It costs LoRA's
update plus one (out, in) matrix B·A and its row norms per step, and a few elementwise passes
over the layer's output (which autograd also keeps) — DoRA's price, measured in the README.
The update depends only on the row's own input and base output, so rows of one batch can use
different DoRA adapters (`mixed_adapters`). The factor f is kept at merge time, so unmerging
divides by exactly the factor that was multiplied in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.quantization.dense import dequantized_weight
from deltatune.quantization.layers import is_quantized_linear


def weight_out_in(base_layer: nn.Module, transposed: bool) -> torch.Tensor:
    """The base weight as (out, in) (GPT-2's Conv1D stores (in, out)). A quantized base gives the
    dense weight it computes with: the magnitude is a norm of the weight, not of its codes."""
    if is_quantized_linear(base_layer):
        return dequantized_weight(base_layer)
    return base_layer.weight.T if transposed else base_layer.weight


def row_norms(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
              scale: float) -> torch.Tensor:
    """‖W + s·B·A‖ over each output row: (out,). weight is (out, in)."""
    combined = torch.addmm(weight, lora_B.to(weight.dtype), lora_A.to(weight.dtype), alpha=scale)
    return torch.linalg.norm(combined, dim=1)


def initial_magnitude(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """m at the start: the row norms of the adapted weight, so the layer starts unchanged."""
    with torch.no_grad():
        return row_norms(weight.float(), lora_A.float(), lora_B.float(), scale).to(lora_A.dtype)


def dora_output(delta: nn.Module, x: torch.Tensor, base_out: torch.Tensor, base_layer: nn.Module,
                transposed: bool) -> torch.Tensor:
    """The DoRA layer's output, given `base_out` (the base layer's output for `x`)."""
    weight = weight_out_in(base_layer, transposed).to(x.dtype)
    lora_A, lora_B = delta.lora_A.weight, delta.lora_B.weight
    norms = row_norms(weight, lora_A.detach(), lora_B.detach(), delta.scale).detach()
    factor = delta.lora_magnitude_vector / norms                      # (out,)
    bias = getattr(base_layer, "bias", None)
    dropout_on = delta.training and isinstance(delta.dropout, nn.Dropout)
    if dropout_on:  # the base term must see the same dropped input as the LoRA term (as PEFT)
        dropped = delta.dropout(x)
        lora_out = delta.lora_B(delta.lora_A(dropped)) * delta.scale
        # f·(drop(x) Wᵀ + lora) + (x Wᵀ + b) - drop(x) Wᵀ: PEFT's (f - 1)·drop(x)Wᵀ + f·lora on top
        plain = F.linear(dropped, weight)
        return base_out + (factor - 1) * plain + factor * lora_out
    # f·(x Wᵀ + s·lora) + b = f·(base_out + s·lora) + (1 - f)·b: two passes over the output,
    # as many as plain LoRA's (scale, add)
    adapted = torch.add(base_out.to(x.dtype), delta.lora_B(delta.lora_A(x)), alpha=delta.scale)
    if bias is None:
        return adapted * factor
    return torch.addcmul((1 - factor) * bias.to(x.dtype), adapted, factor)


def merge_dora(weight: torch.Tensor, delta: nn.Module, delta_weight: torch.Tensor,
               transposed: bool) -> torch.Tensor:
    """W ← f · (W + ΔW) in place; returns f shaped to broadcast over the stored weight."""
    adapted = weight.data + delta_weight.to(weight.dtype)
    rows = adapted.T if transposed else adapted
    factor = delta.lora_magnitude_vector.detach().to(weight.dtype) / torch.linalg.norm(rows, dim=1)
    factor = factor.view(1, -1) if transposed else factor.view(-1, 1)
    weight.data = adapted * factor
    return factor


def unmerge_dora(weight: torch.Tensor, factor: torch.Tensor, delta_weight: torch.Tensor) -> None:
    """Undo `merge_dora` with the factor it used: W ← W' / f - ΔW."""
    weight.data = weight.data / factor - delta_weight.to(weight.dtype)
