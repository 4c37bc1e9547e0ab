"""How a 4-bit base layer computes on CPU: its weight is dequantized, for each forward and each
backward, into one buffer that every 4-bit layer of the thread reuses.

Why: bitsandbytes' CPU path (`matmul_4bit`, forward and backward) dequantizes each weight into a
fresh bf16 tensor. Tensors above glibc's largest mmap threshold (32 MB: a Llama-3.2-3B's MLP
projections are 50 MB) are mapped fresh from the kernel for every call, and their pages are
faulted in and zeroed before the kernel writes them: 25 ms to dequantize a 3072 x 8192 weight into
a new tensor vs 6 ms into a buffer already touched (measured here), i.e. ~3 s of a 3B model's
training step (28 layers x 3 such weights x forward and backward). A smaller weight's tensor comes
from the heap, where freed blocks of every size pile up as memory glibc keeps. One buffer per
thread (as large as the largest weight) removes both, and computes the very same values: the same
bitsandbytes kernel writes it, the same `F.linear` / `matmul` reads it.

The buffer is only ever read inside one call (the matmul that follows the dequantization), and the
autograd function saves the codes, never the buffer, so layers can share it. Anything this module
cannot do (other devices, bitsandbytes' inference layout, a kernel this bitsandbytes build lacks)
goes through bitsandbytes' own forward.
"""
from __future__ import annotations

import ctypes
import threading
import types

import torch
import torch.nn.functional as F
from torch import nn

_KERNEL_DTYPES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}
_local = threading.local()  # one buffer per thread: two threads running the model never share it


def compute_through_one_buffer(layer: nn.Module) -> None:
    """Make a bitsandbytes Linear4bit dequantize into the thread's shared buffer (see above)."""
    layer.forward = types.MethodType(_forward, layer)


def release_buffers() -> None:
    """Free this thread's buffer (it is rebuilt on the next 4-bit forward)."""
    _local.__dict__.pop("buffers", None)


def _kernel(quant_type: str, dtype: torch.dtype):
    """bitsandbytes' C function that dequantizes `quant_type` codes into `dtype` on CPU, or None."""
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

    if isinstance(lib, ErrorHandlerMockBNBNativeLibrary) or dtype not in _KERNEL_DTYPES:
        return None
    return getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{_KERNEL_DTYPES[dtype]}", None)


def _usable(layer: nn.Module, x: torch.Tensor):
    """The kernel for this call, or None when bitsandbytes' own forward must run it."""
    state = getattr(layer.weight, "quant_state", None)
    if (x.device.type != "cpu" or state is None or layer.compute_dtype is None
            or getattr(layer, "support_avx512bf16_for_cpu", False)  # inference kernel (generate, serve)
            or getattr(state, "packing_format_for_cpu", False) or len(state.shape) != 2
            or state.shape[-1] % 2 or state.blocksize >= 2048):  # bitsandbytes falls back there too
        return None
    return _kernel(state.quant_type, layer.compute_dtype)


def _buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    buffers = _local.__dict__.setdefault("buffers", {})
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < numel:
        buffers.pop(dtype, None)  # freed before the larger one is taken
        buffer = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def dequantized(layer: nn.Module, kernel) -> torch.Tensor:
    """The layer's (out, in) weight in its compute dtype, written into the thread's buffer: valid
    until the next call."""
    from bitsandbytes.functional import dequantize_blockwise, get_ptr

    state = layer.weight.quant_state
    absmax = state.absmax
    if state.nested:  # double quantization: the per-block scales are themselves 8-bit codes
        absmax = dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
    absmax = absmax.float().contiguous()
    codes = layer.weight.data.contiguous().view(torch.uint8)
    rows, columns = state.shape
    out = _buffer(rows * columns, layer.compute_dtype).view(rows, columns)
    kernel(get_ptr(codes), get_ptr(absmax), get_ptr(out), ctypes.c_longlong(state.blocksize),
           ctypes.c_longlong(rows), ctypes.c_longlong(columns))
    return out


class _Matmul4bit(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and again in backward (never kept)."""

    @staticmethod
    def forward(ctx, x, layer, kernel, bias):
        ctx.layer, ctx.kernel = layer, kernel
        return F.linear(x, dequantized(layer, kernel), bias)  # what bitsandbytes' forward runs

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad, dequantized(ctx.layer, ctx.kernel).to(grad.dtype))  # as bitsandbytes
        if ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


def _forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    kernel = _usable(self, x)
    if kernel is None:
        return type(self).forward(self, x)
    bias = self.bias
    if bias is not None and bias.dtype != self.compute_dtype:
        bias = bias.to(self.compute_dtype)
    # bitsandbytes computes in compute_dtype and hands back the input's dtype; so does this
    return _Matmul4bit.apply(x.to(self.compute_dtype), self, kernel, bias).to(x.dtype)
