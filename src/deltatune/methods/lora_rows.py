"""Mixed-adapter LoRA: every batch row through its own adapter's update in one product for all rows.

Each LoraLayer keeps a *bank* of the plain LoRA deltas it carries, stacked once and rebuilt only
when the layer's deltas or their weights change (an adapter loaded, evicted or trained):

    A_cat (R, in), B_cat (out, R)      every adapter's A rows / B columns side by side (R = Σ r)
    A_pad (n+1, r_max, in), B_pad (n+1, out, r_max)
                                       zero-padded to the largest rank; slot n is all zeros (rows
                                       of the base model, or of an adapter that skips this layer)

One token per row (a decoding step): all rows times A_cat, a mask keeps each row's own rank
columns (and holds its scale), times B_cat — two small matmuls whatever the mix. Longer inputs (prefill): each row
gathers its padded A and B and one bmm each follows (the "BGMV" of Punica / S-LoRA), so the
product costs what one adapter's costs, however many adapters are resident. On 2 CPU cores at
batch 32 the masked product beats gathering per-row weights for one token (the copies cost more
than the R-wide product) and loses for long inputs (R-wide products per token).

Masked columns and zero padding add exact zeros, so the values are those of the per-adapter
product; only the summation order can differ (float rounding). DoRA deltas (their update depends
on the base output), dropout in training mode, and forwards under autograd with trainable deltas
take the per-adapter path (`row_groups`: a loop over the adapters present).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import threading
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from deltatune.errors import DeltatuneError

_BANK = "_deltatune_lora_bank"
_serving = threading.local()  # .fixed: inside fixed_adapter_weights(); .plan: the last row plan
_LAYOUTS: dict[tuple, tuple] = {}  # equal bank layouts share one object: the row plan's key


@functools.lru_cache(maxsize=64)
def row_groups(row_adapters: tuple[str | None, ...], batch: int,
               device: torch.device) -> tuple[tuple[str, torch.Tensor], ...]:
    """(adapter name, row indices) for every adapter used in a mixed batch; cached per shape."""
    copies = _copies(row_adapters, batch)
    groups = []
    for name in dict.fromkeys(n for n in row_adapters if n is not None):
        rows = [i * copies + c for i, n in enumerate(row_adapters) if n == name for c in range(copies)]
        # cached across calls: a tensor made under inference_mode could never index a trained batch
        with torch.inference_mode(False):
            groups.append((name, torch.tensor(rows, device=device)))
    return tuple(groups)


def _copies(row_adapters: tuple[str | None, ...], batch: int) -> int:
    """Rows per name: generate() expands each row into consecutive copies (num_return_sequences,
    beams) and beam search only reorders rows within one input's block, so copies keep their adapter."""
    if batch % len(row_adapters):
        raise DeltatuneError(f"mixed_adapters: the batch has {batch} rows but {len(row_adapters)} "
                             f"adapter names were given (one per row expected)")
    return batch // len(row_adapters)


@dataclass(frozen=True)
class Bank:
    weights: tuple  # the stacked weights, and their (version, address) then: trained or loaded
    stamp: tuple    # in place (versions move), moved or cast (addresses move)
    names: tuple[str, ...]
    ranks: tuple[int, ...]
    scales: tuple[float, ...]
    layout: tuple  # (names, ranks, scales), one object for every bank of that layout
    a_cat: torch.Tensor
    b_cat: torch.Tensor
    a_pad: torch.Tensor
    b_pad: torch.Tensor


def _bankable(delta: nn.Module) -> bool:
    return delta.lora_magnitude_vector is None and (not delta.training or isinstance(delta.dropout, nn.Identity))


def _stamp(weights: tuple) -> tuple:
    # Weights made inside inference_mode keep no version counter; their address still counts.
    return tuple((-1 if w.is_inference() else w._version, w.data_ptr()) for w in weights)


@contextlib.contextmanager
def fixed_adapter_weights():
    """Inside the block (on this thread) a bank is rebuilt only when the layer's set of deltas or
    its train/eval mode changes, not when a weight changes in place. For a server's forwards,
    where adapters come and go as whole modules (loaded, evicted) and never change in place: the
    per-weight check reads every adapter's tensors on every layer (~25 us a layer once the
    step's matmuls have flushed the caches, 2.3 ms of a 30-layer decoding step with 8 adapters)."""
    before = getattr(_serving, "fixed", False)
    _serving.fixed = True
    try:
        yield
    finally:
        _serving.fixed = before


def bank_of(layer: nn.Module) -> Bank | None:
    """The layer's stacked LoRA deltas (None: none it can stack), rebuilt when they changed: a
    delta added, removed or replaced, train()/eval() (dropout), weights changed, moved or cast.
    Checked on every forward with a few attribute reads, no module walk."""
    deltas = layer.deltas._modules
    held = layer.__dict__.get(_BANK)
    if held is not None:
        of, training, bank = held
        if of == deltas and training == layer.training and (
                bank is None or getattr(_serving, "fixed", False) or bank.stamp == _stamp(bank.weights)):
            return bank
    bank = _build(deltas)
    layer.__dict__[_BANK] = (dict(deltas), layer.training, bank)  # plain attribute: never saved
    return bank


def _build(deltas: dict) -> Bank | None:
    names = [n for n, d in deltas.items() if _bankable(d)]
    if not names:
        return None
    dtype = deltas[names[0]].lora_A.weight.dtype
    names = tuple(n for n in names if deltas[n].lora_A.weight.dtype == dtype)  # one dtype per bank
    a = [deltas[n].lora_A.weight for n in names]
    b = [deltas[n].lora_B.weight for n in names]
    ranks = tuple(w.shape[0] for w in a)
    top = max(ranks)
    # Plain tensors (not inference tensors, no autograd history) so the bank serves any mode.
    with torch.inference_mode(False), torch.no_grad():
        a_pad = a[0].new_zeros(len(names) + 1, top, a[0].shape[1])
        b_pad = b[0].new_zeros(len(names) + 1, b[0].shape[0], top)
        for i, (wa, wb) in enumerate(zip(a, b)):
            a_pad[i, :wa.shape[0]] = wa
            b_pad[i, :, :wb.shape[1]] = wb
        weights = tuple(a + b)
        scales = tuple(deltas[n].scale for n in names)
        if len(_LAYOUTS) > 1024:  # adapters come and go for as long as a server runs
            _LAYOUTS.clear()
        layout = _LAYOUTS.setdefault((names, ranks, scales), (names, ranks, scales))
        return Bank(weights, _stamp(weights), names, ranks, scales, layout,
                    torch.cat(a), torch.cat(b, dim=1), a_pad, b_pad)


@functools.lru_cache(maxsize=64)
def _row_plan(row_adapters: tuple[str | None, ...], batch: int, names: tuple[str, ...],
              ranks: tuple[int, ...], scales: tuple[float, ...], device: torch.device,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Per row: its bank slot (len(names): none), its mask over A_cat's rows holding its scale on
    its own rank columns (0 elsewhere; shaped (rows, 1, R)), its scale."""
    copies = _copies(row_adapters, batch)
    slot_of = {name: i for i, name in enumerate(names)}
    starts = list(itertools.accumulate(ranks, initial=0))
    slots = [slot_of.get(name, len(names)) for name in row_adapters for _ in range(copies)]
    with torch.inference_mode(False):
        mask = torch.zeros(batch, starts[-1], dtype=dtype)
        scale = torch.zeros(batch, 1, 1, dtype=dtype)
        for row, slot in enumerate(slots):
            if slot < len(names):
                mask[row, starts[slot]:starts[slot + 1]] = scales[slot]
                scale[row] = scales[slot]
        return (torch.tensor(slots, device=device), mask.unsqueeze(1).to(device), scale.to(device),
                any(slot < len(names) for slot in slots))


def banked_update(bank: Bank, row_adapters: tuple[str | None, ...], x: torch.Tensor,
                  out: torch.Tensor) -> torch.Tensor | None:
    """scale·B·A·x of each row's own adapter from the bank (zeros for rows outside it); None when
    no row uses the bank."""
    rows = x.shape[0]
    # Every layer of a step asks for the same plan: the last one is kept by identity (the same
    # names tuple, the same interned layout), which costs less than hashing the lru_cache key
    # (0.9 ms of a 30-layer decoding step at 14 rows over 4 adapters, measured).
    last = getattr(_serving, "plan", None)
    if (last is not None and last[0] is row_adapters and last[1] == rows and last[2] is bank.layout
            and last[3] == x.device and last[4] == bank.a_cat.dtype):
        slots, mask, scale, used = last[5]
    else:
        plan = _row_plan(row_adapters, rows, bank.names, bank.ranks, bank.scales, x.device, bank.a_cat.dtype)
        _serving.plan = (row_adapters, rows, bank.layout, x.device, bank.a_cat.dtype, plan)
        slots, mask, scale, used = plan
    if not used:
        return None
    lora_x = x.to(bank.a_cat.dtype) if not torch.is_autocast_enabled() else x
    flat = lora_x.reshape(rows, -1, x.shape[-1])  # (rows, tokens, in)
    # the scale multiplies the rank-r values, as in LoraDelta.forward (SCALE_AT_RANK)
    if flat.shape[1] == 1 or len(bank.names) == 1:
        update = F.linear(F.linear(flat, bank.a_cat) * mask, bank.b_cat)
    else:
        a = bank.a_pad.index_select(0, slots).transpose(1, 2)  # (rows, in, r_max)
        b = bank.b_pad.index_select(0, slots).transpose(1, 2)  # (rows, r_max, out)
        update = torch.bmm(torch.bmm(flat, a) * scale, b)
    return update.reshape(*out.shape[:-1], update.shape[-1]).to(out.dtype)


def mixed_update(layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """What each row's own adapter adds to the base output `out` of LoraLayer `layer` (zeros for
    rows without one): stacked deltas in one product, the rest one adapter at a time."""
    row_adapters = layer.row_adapters
    grad = torch.is_grad_enabled()
    groups = row_groups(row_adapters, x.shape[0], x.device) if grad else None
    tracked = grad and any(
        p.requires_grad for name, _ in groups if name in layer.deltas for p in layer.deltas[name].parameters())
    bank = None if tracked else bank_of(layer)
    extra = banked_update(bank, row_adapters, x, out) if bank is not None else None
    if extra is not None and len(bank.names) == len(layer.deltas._modules):
        return extra  # every delta of this layer is in the bank: nothing left to add
    if groups is None:
        groups = row_groups(row_adapters, x.shape[0], x.device)
    done = set(bank.names) if extra is not None else set()
    if extra is None:
        extra = torch.zeros_like(out)
    # Each row belongs to one adapter, so copying its update in is the sum; on CPU index_copy_ on
    # the 2-D (rows, features) view stays fast where index_add_ can take ~10-100 ms per call.
    flat = extra.view(extra.shape[0], -1)
    for name, rows in groups:
        if name in done or name not in layer.deltas:  # banked, or not touching this layer
            continue
        update = layer._update(layer.deltas[name], x.index_select(0, rows), out.index_select(0, rows))
        flat.index_copy_(0, rows, update.reshape(len(rows), -1))
    return extra
