"""Training losses, summed (the caller divides by the global number of targets).

Causal LM: the LM head of a 49k-vocabulary model turns (batch, seq, hidden) into
(batch, seq, vocab) logits, which dominate memory and much of the compute. We never let the model
build them: `lm_head_input` swallows the head's input during the forward pass (the model returns
empty logits), then `causal_lm_loss` applies the head only at positions that carry a label, in
chunks of rows, computing each chunk's gradients on the spot so no chunk's logits are kept.
`train.loss_chunk_tokens` sets the chunk (0: every labelled row in one chunk, as a plain
cross-entropy over the whole sequence's logits would hold them).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_ROWS = 1024  # rows of logits alive at once: 1024 x 49152 floats = 200 MB


class _Captured:
    hidden: torch.Tensor | None = None


@contextlib.contextmanager
def lm_head_input(model: nn.Module) -> Iterator[_Captured]:
    """Inside the block, the LM head sees an empty sequence; its real input is kept in `.hidden`."""
    captured = _Captured()

    def hook(module: nn.Module, args: tuple) -> tuple:
        captured.hidden = args[0]                # (batch, seq, hidden)
        return (args[0][..., :0, :],) + args[1:]  # (batch, 0, hidden): the head does no work

    handle = model.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _compute_dtype(device_type: str, fallback: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return fallback


def _add_chunk_gradients(exp: torch.Tensor, row_sum: torch.Tensor, targets: torch.Tensor,
                         h: torch.Tensor, w: torch.Tensor, dtype: torch.dtype, rows: slice,
                         grad_hidden: torch.Tensor | None, grad_weight: torch.Tensor | None,
                         grad_bias: torch.Tensor | None) -> None:
    """Turn one chunk's exp(logits - max) into softmax - onehot in place (d loss / d logits)
    and add its share to the gradients wrt hidden (rows `rows`), weight and bias."""
    grad_logits = exp.div_(row_sum[:, None])
    grad_logits[torch.arange(targets.shape[0], device=targets.device), targets] -= 1
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0)
    grad_logits = grad_logits.to(dtype)  # under bf16: a half-size copy beside the fp32 buffer
    if grad_hidden is not None:
        grad_hidden[rows] = grad_logits @ w
    if grad_weight is not None:
        grad_weight += (grad_logits.T @ h).float()


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weightᵀ + bias, target_i), with the gradients computed in forward.

    The loss is a scalar, so d loss / d logits = softmax - onehot is known in forward; keeping
    only the gradients wrt hidden / weight / bias costs (rows, hidden) + (vocab, hidden) memory
    instead of (rows, vocab) logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows: int, grad_enabled: bool):
        device_type = hidden.device.type
        dtype = _compute_dtype(device_type, weight.dtype)
        # needs_input_grad ignores torch.no_grad(), so the caller's grad mode comes in explicitly:
        # evaluation must not pay for gradients.
        need_hidden = grad_enabled and ctx.needs_input_grad[0]
        need_weight = grad_enabled and ctx.needs_input_grad[1]
        need_bias = grad_enabled and bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.to(dtype)
        with torch.autocast(device_type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_rows):
                h = hidden[start:start + chunk_rows].to(dtype)             # (rows, hidden)
                t = targets[start:start + chunk_rows]                       # (rows,)
                # One fp32 (rows, vocab) buffer per chunk, worked in place: logits, then
                # exp(logits - max), then softmax - onehot (the gradient wrt the logits).
                logits = (h @ w.T).float()
                if bias is not None:
                    logits += bias.float()
                target_logit = logits.gather(1, t[:, None]).squeeze(1)     # (rows,)
                row_max = logits.amax(dim=-1, keepdim=True)                 # (rows, 1)
                exp = logits.sub_(row_max).exp_()
                del logits
                row_sum = exp.sum(dim=-1)                                   # (rows,)
                total += (row_max.squeeze(1) + row_sum.log() - target_logit).sum()
                if need_hidden or need_weight or need_bias:
                    chunk = slice(start, start + chunk_rows)
                    _add_chunk_gradients(exp, row_sum, t, h, w, dtype, chunk,
                                         grad_hidden, grad_weight, grad_bias)
                # freed before the next chunk's logits exist, so one chunk is alive at a time
                del exp
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output
        return (None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * scale).to(ctx.dtypes[0]),
                None if grad_bias is None else (grad_bias * scale).to(ctx.dtypes[1]),
                None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                         chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` against `targets`, never holding all the logits.

    hidden: (rows, hidden), targets: (rows,). A plain nn.Linear head uses the fused path; any
    other head (e.g. a LoRA-wrapped lm_head) is applied chunk by chunk under activation
    checkpointing, which recomputes each chunk's logits in backward.
    """
    if type(head) is nn.Linear:
        return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk_rows,
                                         torch.is_grad_enabled())

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_rows):
        h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
        total = total + (checkpoint(chunk_loss, h, t, use_reentrant=False)
                         if torch.is_grad_enabled() else chunk_loss(h, t))
    return total


def causal_lm_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module,
                   chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Summed next-token loss: position t predicts labels[t + 1]; -100 labels are skipped.

    hidden: (batch, seq', hidden) with seq' >= seq; extra leading positions (virtual tokens that
    prompt methods prepend) carry no labels and are dropped. labels: (batch, seq).
    chunk_rows: labelled rows whose logits exist at once; 0: all of them in one chunk.
    """
    hidden = hidden[:, hidden.shape[1] - labels.shape[1]:]
    targets = labels[:, 1:]                          # (batch, seq - 1)
    keep = targets != IGNORE_INDEX
    rows = hidden[:, :-1][keep]                      # (n_targets, hidden)
    if rows.shape[0] == 0:
        return hidden.sum() * 0.0                    # keeps the graph (and DDP) happy
    return linear_cross_entropy(rows, head, targets[keep], chunk_rows or rows.shape[0])


def count_targets(task: str, labels: torch.Tensor) -> int:
    """How many terms a batch adds to the summed loss."""
    if task == "classification":
        return int(labels.shape[0])
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def batch_loss(model: nn.Module, task: str, batch: dict[str, torch.Tensor],
               head_owner: nn.Module | None = None, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Summed loss of one batch. `model` may be a DDP wrapper; `head_owner` is the bare model.
    chunk_rows: see causal_lm_loss (classification heads give one row per example: no chunks)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if task == "classification":
        logits = model(**inputs).logits              # (batch, num_labels)
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    bare = head_owner if head_owner is not None else model
    with lm_head_input(bare) as captured:
        model(**inputs, use_cache=False)
    return causal_lm_loss(captured.hidden, labels, bare.get_output_embeddings(), chunk_rows)
