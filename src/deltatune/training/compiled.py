"""`train.compile`: torch.compile of the elementwise chains between a decoder's matrix products.

On CPU a LoRA step of a small decoder spends more time in memory-bound elementwise kernels
(RMSNorm's pow/mean/rsqrt/mul, SwiGLU's SiLU and product, their backward) than in products;
compiled, each chain becomes one fused loop forward and one backward. Only these pure functions
of tensors are compiled, never a layer: the layers call LoRA wrappers and the per-example
attention (whose example spans are read from the data, a graph break), and compiling around them
recompiled per example count and cost minutes. With dynamic shapes a function compiles once per
step kind and is reused at every token count (no recompilation as packed rows change length).

    with compiled_elementwise(model):     # inside: the model's norms and MLPs use the fused code
        loss = ...; loss.backward()

The fused code computes the same formulas; the results differ from eager only by rounding
(eager rounds SwiGLU's SiLU to bf16 before the product, the fused loop does not).
"""
from __future__ import annotations

import contextlib
import functools
import sys
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# Norms computed as Llama's: fp32 x·rsqrt(mean(x²)+eps), cast back, times the weight (Gemma's
# 1+weight norm is not one of them). MLPs computed as down(silu(gate(x)) · up(x)).
NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm")
MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
ENABLED = True  # benchmarks/training/ab_lever.py turns it off in place to time both


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = hidden.dtype
    h = hidden.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's rotary embedding of q and k (heads on dim 1), cast to `dtype` (autocast's, which
    attention would cast them to anyway) inside the same loop."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def turned(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    q, k = q * cos + turned(q) * sin, k * cos + turned(k) * sin
    return (q, k) if dtype is None else (q.to(dtype), k.to(dtype))


FUNCTIONS = {"rms_norm": rms_norm, "silu_mul": silu_mul, "rotary": rotary}


@functools.cache
def _compiled(name: str):
    return torch.compile(FUNCTIONS[name], dynamic=True)


def _norm_forward(module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    fn = _compiled("rms_norm") if ENABLED else rms_norm
    return fn(hidden, module.weight, module.variance_epsilon)


def _mlp_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    fn = _compiled("silu_mul") if ENABLED else silu_mul
    return module.down_proj(fn(module.gate_proj(x), module.up_proj(x)))


def _rotary_forward(original, q, k, cos, sin, *args, **kwargs):
    """Stands in for a modeling module's apply_rotary_pos_emb (its attention calls it)."""
    if args or kwargs:  # not the plain (q, k, cos, sin) call this replaces
        return original(q, k, cos, sin, *args, **kwargs)
    device = q.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return (_compiled("rotary") if ENABLED else rotary)(q, k, cos, sin, dtype)


ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")
_PATCHED: dict[str, list] = {}  # modeling module name -> [its own apply_rotary_pos_emb, users]


@contextlib.contextmanager
def _compiled_rotary(model: nn.Module) -> Iterator[int]:
    """While inside, the modeling modules of the model's attention layers apply rotary
    embeddings through the compiled function (module globals: the attention looks them up)."""
    names = sorted({type(m).__module__ for m in model.modules() if type(m).__name__ in ATTENTIONS})
    names = [n for n in names if callable(getattr(sys.modules.get(n), "apply_rotary_pos_emb", None))]
    for name in names:
        entry = _PATCHED.setdefault(name, [sys.modules[name].apply_rotary_pos_emb, 0])
        entry[1] += 1
        sys.modules[name].apply_rotary_pos_emb = functools.partial(_rotary_forward, entry[0])
    try:
        yield len(names)
    finally:
        for name in names if _PATCHED is not None else ():  # None: the interpreter is exiting
            entry = _PATCHED[name]
            entry[1] -= 1
            if not entry[1]:
                sys.modules[name].apply_rotary_pos_emb = _PATCHED.pop(name)[0]


def _is_silu(act: object) -> bool:
    """nn.SiLU, or transformers' SiLUActivation (F.silu; a hub kernel may replace it, so by name)."""
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _routes(model: nn.Module) -> list[tuple[nn.Module, object]]:
    routes = []
    for module in model.modules():
        kind = type(module).__name__
        if kind in NORMS and hasattr(module, "variance_epsilon"):
            routes.append((module, functools.partial(_norm_forward, module)))
        elif (kind in MLPS and _is_silu(getattr(module, "act_fn", None))
              and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj"))):
            routes.append((module, functools.partial(_mlp_forward, module)))
    return routes


@contextlib.contextmanager
def compiled_elementwise(model: nn.Module) -> Iterator[int]:
    """Route the model's norms, SwiGLU MLPs and rotary embeddings through the compiled functions
    inside the block; yields how many modules were routed (0: a model with none of them)."""
    routes = [(m, f) for m, f in _routes(model) if "forward" not in vars(m)]  # not yet routed
    for module, forward in routes:
        module.forward = forward  # an instance attribute: shadows the class's forward
    try:
        with _compiled_rotary(model) as rotaries:
            yield len(routes) + rotaries
    finally:
        for module, _ in routes:
            del module.forward
