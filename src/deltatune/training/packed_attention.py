"""Attention over packed rows without a dense mask.

A packed row holds several examples end to end with position ids restarting at 0 for each
(`Collator(packing=True)`). transformers isolates them by building a (row, row) block-diagonal
mask and running one masked attention over the whole row; on CPU that costs quadratically in the
row length (8 alpaca rows packed into one row of ~2,000 tokens: ~4M mask entries per head), which
is why padding-free training was barely faster than padding there. Here every example's slice
gets its own causal attention (cost sum(L_i²) instead of (sum L_i)²) and no mask is built.

    with packed_attention(model):
        model(input_ids=ids, position_ids=positions, use_cache=False)   # ids: (rows, seq)

Inside the block, batches that do carry an attention_mask (padded batches) are computed exactly
as transformers' "sdpa" would; only mask-less batches take the per-example path.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

PACKED_ATTENTION = "deltatune_packed_sdpa"
ONE_ROW = 2**62  # a packing length no batch reaches: the whole batch becomes one row


def example_spans(positions: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of every example in one packed row: a new one starts where the position is 0.

    positions: (seq,). A row that never restarts is one example (plain causal attention).
    """
    starts = (positions == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    ends = starts[1:] + [positions.shape[0]]
    return list(zip(starts, ends))


def _packed_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0,
                 scaling: float | None = None, position_ids: torch.Tensor | None = None,
                 **kwargs) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # query: (rows, heads, seq, head_dim); key, value: (rows, kv_heads, seq, head_dim)
    rows, _, length, _ = query.shape
    per_example = (attention_mask is None and position_ids is not None and key.shape[2] == length
                   and length > 1 and getattr(module, "is_causal", True))
    if not per_example:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    grouped = key.shape[1] != query.shape[1]  # GQA: SDPA repeats the kv heads itself
    positions = position_ids.expand(rows, -1)
    spans = [(row, start, end) for row in range(rows) for start, end in example_spans(positions[row])]
    dtype = _compute_dtype(query)
    if query.device.type == "cpu" and dtype in _CPU_FLASH_DTYPES and dropout == 0.0:
        # One autograd node per layer instead of three slices and a slice-write per example:
        # their backward zero-fills and adds a full-size gradient per example (measured: a
        # quarter of the step in fill_/add_/copy_ at 8 examples a row).
        return _PerExampleFlash.apply(query.to(dtype), key.to(dtype), value.to(dtype), spans,
                                      scaling), None
    # Written straight into the (rows, seq, heads, head_dim) layout the caller wants: no
    # transpose-and-copy of the whole output afterwards (nor its copy back in backward).
    out = query.new_empty(rows, length, query.shape[1], query.shape[3])
    heads_first = out.transpose(1, 2)  # (rows, heads, seq, head_dim), a view of out
    for row, start, end in spans:
        heads_first[row:row + 1, :, start:end] = F.scaled_dot_product_attention(
            query[row:row + 1, :, start:end], key[row:row + 1, :, start:end],
            value[row:row + 1, :, start:end], dropout_p=dropout, scale=scaling,
            is_causal=True, enable_gqa=grouped)
    return out, None  # (rows, seq, heads, head_dim)


_CPU_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype SDPA would compute in here: autocast's (it casts q, k and v) or the inputs'."""
    device = query.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype


class _PerExampleFlash(torch.autograd.Function):
    """Causal attention of every example span of every row, through the same CPU flash kernels
    SDPA picks (the same numbers), writing the output and the gradients of q, k and v in place
    span by span. q: (rows, heads, seq, d); k, v: (rows, kv_heads, seq, d) (GQA is native to
    the kernel); returns (rows, seq, heads, d). The spans cover every position of every row."""

    @staticmethod
    def forward(ctx, query, key, value, spans, scale):
        rows, heads, length, dim = query.shape
        out = query.new_empty(rows, length, heads, dim)
        heads_first = out.transpose(1, 2)
        lses = []
        for row, start, end in spans:
            part = (slice(row, row + 1), slice(None), slice(start, end))
            span_out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query[part], key[part], value[part], 0.0, True, scale=scale)
            heads_first[part] = span_out
            lses.append(lse)
        ctx.save_for_backward(query, key, value, out)
        ctx.spans, ctx.lses, ctx.scale = spans, lses, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out = ctx.saved_tensors
        grad_heads_first, out_heads_first = grad_out.transpose(1, 2), out.transpose(1, 2)
        # empty_like keeps q/k/v's strides; every position is written below (spans cover rows).
        grads = (torch.empty_like(query), torch.empty_like(key), torch.empty_like(value))
        scale = ctx.scale if ctx.scale is not None else query.shape[-1] ** -0.5
        for (row, start, end), lse in zip(ctx.spans, ctx.lses):
            part = (slice(row, row + 1), slice(None), slice(start, end))
            args = (grad_heads_first[part], query[part], key[part], value[part], out_heads_first[part], lse)
            if end - start <= EXPLICIT_BACKWARD_TOKENS:
                span_grads = _explicit_backward(*args, scale)
            else:
                span_grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    *args, 0.0, True, scale=scale)
            for grad, span_grad in zip(grads, span_grads):
                grad[part] = span_grad
        return (*grads, None, None)


# The CPU flash backward costs ~4-9x its forward on short examples (per-call setup, blocking for
# long rows); up to this many tokens an example's backward recomputes its probabilities from the
# saved log-sum-exp with a few batched products instead (one thread: 2-3x faster at 30-160
# tokens, 1.4x at 200, even at ~250, 2x slower at 500 where its fp32 L x L products dominate;
# the L x L matrices live only inside this call). 0: always flash.
EXPLICIT_BACKWARD_TOKENS = 224


def _explicit_backward(grad_out, query, key, value, out, lse, scale: float):
    """Gradients of causal attention of one example (batch 1) from its saved output and log-sum-
    exp: P = exp(s·q·kᵀ - lse), dV = Pᵀ·dO, dS = P∘(dO·Vᵀ - rowsum(dO∘O)), dQ = s·dS·K,
    dK = s·dSᵀ·Q. Scores and dO·Vᵀ in fp32 (as flash keeps them); P and dS enter the bf16
    products in bf16. Query heads are grouped by their key-value head (GQA: head h reads h // rep)."""
    _, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    rep = heads // kv_heads
    q = query[0].reshape(kv_heads, rep * length, dim)
    grad = grad_out[0].reshape(kv_heads, rep * length, dim)
    k, v = key[0], value[0]
    scores = torch.bmm(q.float(), k.transpose(1, 2).float()).view(kv_heads, rep, length, length)
    scores.mul_(scale).sub_(lse[0].reshape(kv_heads, rep, length, 1).float())
    future = torch.ones(length, length, dtype=torch.bool, device=query.device).triu_(1)
    probs = scores.exp_().masked_fill_(future, 0.0)
    grad_probs = torch.bmm(grad.float(), v.transpose(1, 2).float()).view(kv_heads, rep, length, length)
    rowsum = (grad_out[0].float() * out[0].float()).sum(-1).reshape(kv_heads, rep, length, 1)
    grad_value = torch.bmm(probs.view(kv_heads, rep * length, length).transpose(1, 2).to(v.dtype), grad)
    grad_scores = probs.mul_(grad_probs.sub_(rowsum)).mul_(scale).to(q.dtype).view(kv_heads, rep * length, length)
    grad_query = torch.bmm(grad_scores, k).view(1, heads, length, dim)
    grad_key = torch.bmm(grad_scores.transpose(1, 2), q).view(1, kv_heads, length, dim)
    return grad_query, grad_key, grad_value.view(1, kv_heads, length, dim)


def _packed_mask(batch_size: int, q_length: int, kv_length: int, *args,
                 attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length:
        return None  # causality and example boundaries are enforced in _packed_sdpa
    return sdpa_mask(batch_size, q_length, kv_length, *args, attention_mask=attention_mask,
                     **kwargs)


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, _packed_sdpa)
    AttentionMaskInterface.register(PACKED_ATTENTION, _packed_mask)


# Decoders whose attention is plain causal SDPA (no sliding window, soft-capping or ALiBi), so
# per-example causal attention is exactly what their masked attention computes.
PLAIN_CAUSAL_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def supports_packed_attention(model: nn.Module) -> bool:
    """True for plain-causal transformers decoders on "sdpa" attention that no prompt method has
    re-routed (prompt methods prepend virtual tokens to every row, which packing would break)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "model_type", None) not in PLAIN_CAUSAL_MODEL_TYPES:
        return False
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return window is None and not hasattr(model, "deltatune_virtual_tokens")


@contextlib.contextmanager
def packed_attention(model: nn.Module) -> Iterator[bool]:
    """Route the model's attention through the per-example path inside the block; yields whether
    it did (models not on sdpa attention are left alone)."""
    if not supports_packed_attention(model):
        yield False
        return
    _register()
    model.config._attn_implementation = PACKED_ATTENTION
    try:
        yield True
    finally:
        model.config._attn_implementation = "sdpa"
