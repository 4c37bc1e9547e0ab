"""`deltatune plan CONFIG --max-length auto --memory 20GB|auto`: the longest sequence (one row,
batch 1) that trains one step of each method within a memory budget.

It uses plan's own model of a step's peak (compare/plan.py): the process with the model loaded
(measured), the delta, gradients and AdamW state, the activations autograd saves for backward
(measured by running the adapted model's forward and loss under the run's levers), the loss's
logits chunk and the runtime allowance. One step fills no allocator ratchet (allocator_fill of
one batch is 0), but its backward makes gradients while the activations are alive: the saved
bytes count ONE_STEP_FACTOR times.

The saved bytes are measured at three short lengths (PROBE_TOKENS, twice and three times that)
and the quadratic through them is exact: what a step saves is a sum of per-token tensors (linear)
and, under eager attention, (heads, seq, seq) score matrices (quadratic); the loss's logits chunk
and the checkpointed layer inputs follow their own formulas. The longest length is then found by
bisection on that curve, up to the model's max_position_embeddings.

    plans = length_plans(run_config, ["lora", "full"], memory_bytes=20 * 2**30)
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, Callable

import psutil
import torch
from torch import nn

from deltatune.errors import DeltatuneError

PROBE_TOKENS = 256
# In one step the peak holds, beside the saved activations, what backward makes while they are
# still alive (the gradients of each layer's activations, a recomputed layer under
# checkpointing). Measured on a one-step run of an 8-layer Llama (hidden 256, fp32, LoRA,
# tests/test_plan_max_length.py): the step's peak above the process before it was 1.55-1.75x
# the saved bytes at 500-3,000 tokens. (plan's multi-step RETENTION factors include it.)
ONE_STEP_FACTOR = 1.6
LONGEST_CHECKED = 2**24  # a model without max_position_embeddings: no length beyond this
MB = 2**20
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": MB, "mb": MB, "mib": MB,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


@dataclass
class LengthPlan:
    method: str
    max_length: int             # 0: not even one token fits
    peak_bytes: int             # planned peak of one step at max_length
    memory_bytes: int           # the budget
    config_length: int          # data.max_length
    config_length_peak_bytes: int
    limited_by: str             # memory | positions (the model's max_position_embeddings)
    baseline_bytes: int


def parse_memory(text: str) -> int | None:
    """'20GB' -> bytes (GB = GiB = 2**30, as RSS is counted); 'auto' -> None."""
    value = str(text).strip().lower()
    if value == "auto":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    if not match or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise DeltatuneError(f"--memory: expected a size such as 20GB, 512MB or auto, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def free_memory_bytes() -> int:
    """`--memory auto`: what the machine has available now, plus what this process holds
    (before the model loads: the interpreter and libraries a training process holds too)."""
    from deltatune.compare.plan import current_rss

    return psutil.virtual_memory().available + current_rss()


def one_row(length: int, vocab: int, task: str, collator: Any) -> dict:
    """A batch of one row of `length` token ids, every position labelled, as the trainer
    batches it for this method (padding-free where it applies)."""
    from deltatune.data.dataset import Example

    ids = [3 + (7 * k) % max(1, vocab - 3) for k in range(length)]
    label = 0 if task == "classification" else list(ids)
    return collator([Example(input_ids=ids, labels=label)])


def peak_curve(model: nn.Module, method_values: dict, run_config: Any, train: Any,
               baseline_bytes: int, pad_token_id: int | None,
               limit: int = LONGEST_CHECKED) -> tuple[Callable[[int], int], int]:
    """(length -> the planned peak bytes of one batch-1 step of that many tokens, the longest
    length the model takes: `limit` positions less the virtual tokens a prompt method adds)."""
    from deltatune.compare.plan import fixed_bytes
    from deltatune.deltas import apply
    from deltatune.methods import config_from_dict
    from deltatune.training.levers import set_attention
    from deltatune.training.optimization import resolve_bf16

    config = config_from_dict(method_values)
    adapted = apply(copy.deepcopy(model), config)
    set_attention(adapted, getattr(train, "attention", "auto"))
    task = run_config.task
    fixed = fixed_bytes(model, adapted, config.method, baseline_bytes)
    bf16 = resolve_bf16(train.bf16, torch.device("cpu"))
    limit -= int(getattr(config, "num_virtual_tokens", 0) or 0)
    curve = saved_curve(adapted, run_config, train, pad_token_id, bf16, limit)
    del adapted
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    hidden = int(getattr(model.config, "hidden_size", 0) or 0)

    def peak(length: int) -> int:
        return int(fixed + length_activation_bytes(curve(length), length, hidden, vocab, task,
                                                   train, bf16))

    return peak, limit


def saved_curve(adapted: nn.Module, run_config: Any, train: Any, pad_token_id: int | None,
                bf16: bool, limit: int = LONGEST_CHECKED) -> Callable[[int], Any]:
    """length -> what autograd saves in one batch-1 step of that many tokens (SavedBytes, each
    part on the quadratic through three measured lengths)."""
    from deltatune.compare.activations import measure_saved
    from deltatune.training.batching import training_collator

    task = run_config.task
    vocab = int(getattr(adapted.config, "vocab_size", 0) or 0) or 2
    step = max(2, min(PROBE_TOKENS, limit // 3))
    probes = [step, 2 * step, 3 * step]
    # Measured with tiles shorter than the probes, so the curve is that of a tiled sequence (a
    # tile's saved bytes do not depend on its size); the loss's logits are counted by formula.
    tile = getattr(train, "mlp_tile_tokens", 0)
    measure = dataclasses.replace(train, mlp_tile_tokens=min(tile, max(1, step // 4))) if tile else train
    data = dataclasses.replace(run_config.data, max_length=max(probes))
    collator = training_collator(adapted, pad_token_id or 0, task, data, train)
    measured = [measure_saved(adapted, task, one_row(length, vocab, task, collator), collator.packing,
                              bf16, measure) for length in probes]
    parts = ("total", "kept_inputs", "one_layer", "outside")
    curves = {part: _through(probes, [getattr(m, part) for m in measured]) for part in parts}
    return lambda length: measured[-1].scaled({part: f(length) for part, f in curves.items()})


def length_activation_bytes(saved: Any, length: int, hidden: int, vocab: int, task: str,
                            train: Any, bf16: bool, layers: int | None = None) -> int:
    """The activations' share of one batch-1 step's peak at `length` tokens (every position
    labelled): step_activation_bytes with ONE_STEP_FACTOR and the loss's logits chunk."""
    from deltatune.compare.activations import chunk_logit_bytes, step_activation_bytes

    logits = chunk_logit_bytes(length, vocab, getattr(train, "loss_chunk_tokens", None),
                               bf16) if task == "causal-lm" else 0
    return step_activation_bytes(saved, length, hidden, logits, ONE_STEP_FACTOR, train, layers)


def _through(xs: list[int], ys: list[int]) -> Callable[[int], float]:
    """The polynomial of degree len(xs) - 1 through the points (Lagrange's form)."""
    def value(x: float) -> float:
        total = 0.0
        for i, (xi, yi) in enumerate(zip(xs, ys)):
            term = float(yi)
            for j, xj in enumerate(xs):
                if j != i:
                    term *= (x - xj) / (xi - xj)
            total += term
        return total

    return value


def longest_within(peak: Callable[[int], int], memory: int, limit: int) -> int:
    """The largest length in [1, limit] whose peak fits `memory` (0: none); the peak grows with
    the length, so bisection."""
    if peak(1) > memory:
        return 0
    if peak(limit) <= memory:
        return limit
    low, high = 1, limit  # peak(low) fits, peak(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if peak(middle) <= memory else (low, middle)
    return low


def length_plans(run_config: Any, methods: list[str], memory_bytes: int | None,
                 per_method: dict | None = None, lengths: list[int] = (),
                 dtype: torch.dtype | None = None) -> tuple[list[LengthPlan], dict[str, dict[int, int]]]:
    """(one LengthPlan per method, {method: {length: planned peak}} for `lengths`)."""
    from deltatune.compare.plan import current_rss, touch_weights
    from deltatune.compare.settings import row_settings, split_row
    from deltatune.models import load_model, release_freed_memory
    from deltatune.training import loop as _train  # noqa: F401  (training imports count toward the baseline)

    memory = free_memory_bytes() if memory_bytes is None else memory_bytes
    process_bytes = current_rss()
    plans, peaks = [], {}
    groups: dict[str, list[str]] = {}
    for row in methods:
        groups.setdefault(str(split_row(row)[1] or run_config.quantize), []).append(row)
    for quantize, rows in groups.items():
        before = current_rss()
        num_labels = run_config.num_labels or 2 if run_config.task == "classification" else None
        model, tokenizer = load_model(run_config.model, task=run_config.task, quantize=quantize,
                                      num_labels=num_labels, dtype=dtype)
        touch_weights(model)
        baseline = process_bytes + max(0, current_rss() - before)
        if baseline > memory:
            raise DeltatuneError(
                f"--memory {memory / MB:,.0f} MB: the model alone needs more ({baseline / MB:,.0f} MB "
                f"with its weights loaded, before any training)")
        limit = int(getattr(model.config, "max_position_embeddings", 0) or LONGEST_CHECKED)
        for row in rows:
            own = row_settings(per_method or {}, row)
            name = split_row(row)[0]
            values = {"name": name, **own.get("method", {})}
            if name == (run_config.method or {}).get("name"):
                values = {**run_config.method, **values}
            train = dataclasses.replace(run_config.train, **own.get("train", {}))
            curve, own_limit = peak_curve(model, values, run_config, train, baseline,
                                          tokenizer.pad_token_id, limit)
            longest = longest_within(curve, memory, own_limit)
            own_length = run_config.data.max_length
            plans.append(LengthPlan(
                method=row, max_length=longest, peak_bytes=curve(longest) if longest else curve(1),
                memory_bytes=memory, config_length=own_length,
                config_length_peak_bytes=curve(own_length),
                limited_by="positions" if longest == own_limit else "memory", baseline_bytes=baseline))
            peaks[row] = {length: curve(length) for length in lengths}
        del model
        release_freed_memory()
    return plans, peaks


def format_length_plans(plans: list[LengthPlan]) -> str:
    header = (f"{'method':10s} {'at data.max_length':>20s} {'MB':>8s} {'max length':>11s} "
              f"{'MB':>8s}  limited by")
    rows = [header, "-" * len(header)]
    for p in plans:
        longest = f"{p.max_length:,d}" if p.max_length else "none fits"
        rows.append(f"{p.method:10s} {p.config_length:>20,d} {p.config_length_peak_bytes / MB:>8,.0f} "
                    f"{longest:>11s} {p.peak_bytes / MB:>8,.0f}  {p.limited_by}")
    if plans:
        rows.append(f"(one row, batch 1, one step within {plans[0].memory_bytes / MB:,.0f} MB; "
                    f"baseline with the model loaded: {plans[0].baseline_bytes / MB:,.0f} MB)")
    return "\n".join(rows)


def max_length_from_config(config_path: str, overrides: list[str], methods: str | None,
                           memory: str, as_json: bool) -> list[dict]:
    from deltatune.compare.settings import read_compare_config

    memory_bytes = parse_memory(memory)  # a bad value fails before anything loads
    run_config, settings = read_compare_config(config_path, overrides)
    names = methods.split(",") if methods else settings["methods"]
    plans, _ = length_plans(run_config, names, memory_bytes, settings["per_method"])
    records = [{"method": p.method, "max_length": p.max_length, "peak_mb": round(p.peak_bytes / MB, 1),
                "memory_mb": round(p.memory_bytes / MB, 1), "limited_by": p.limited_by,
                "config_length": p.config_length,
                "config_length_peak_mb": round(p.config_length_peak_bytes / MB, 1),
                "baseline_mb": round(p.baseline_bytes / MB, 1)} for p in plans]
    if as_json:
        for record in records:
            print(json.dumps(record))
    else:
        print(format_length_plans(plans))
    return records
