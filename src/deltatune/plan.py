"""Predict, before training, what each method will cost: parameters, memory and file size.

The prediction adds, to the memory the process already holds once the model is loaded (measured,
not guessed: the interpreter, torch, the weights), what training adds on top:

    trainable parameters · 4 B  for gradients, · 8 B for AdamW's two moments (fp32)
    activations kept for backward: layers · batch · seq · hidden · bytes-per-element-per-layer,
        where seq includes virtual tokens and the per-layer factor depends on the family and on
        bf16 autocast (calibrated against measured runs; see README "plan vs measured")
    bf16 copies of the frozen linear weights that autocast makes and backward keeps (bf16 only)
    the chunked LM-head logits of a causal LM (never the whole batch x seq x vocab)

It is an estimate for the step at the longest sequence; `compare` prints it beside the measured
peak so the estimate is checked on every run.
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch
from torch import nn

from .deltas import apply
from .methods import config_from_dict, get_method
from .methods.base import count_parameters
from .models import architecture_of, transformer_layers

# Bytes kept per (layer · token · hidden unit) for backward; measured on the presets (fp32 model).
ACTIVATION_BYTES = {("bert", True): 60, ("bert", False): 100,
                    ("llama", True): 72, ("llama", False): 120,
                    ("gpt2", True): 60, ("gpt2", False): 100}
LOGIT_CHUNK_ROWS = 1024  # matches losses.CHUNK_ROWS: rows of logits alive at once
# What a training process holds beyond the planning process's model and the terms above:
# allocator arenas kept after the first steps, evaluation and checkpoint buffers, the data.
# Measured: MiniLM/SST-2 training processes peaked 150-700 MB above the terms above (runs of
# `deltatune compare examples/demo-compare-minilm.yaml`); 400 MB keeps all six within 25%.
RUNTIME_ALLOWANCE_BYTES = 400 * 1024 * 1024


@dataclass
class MethodPlan:
    method: str
    trainable_params: int
    total_params: int
    trainable_share: float
    weights_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    baseline_bytes: int          # what the process holds with the model loaded (measured)
    predicted_peak_bytes: int
    predicted_file_bytes: int


def virtual_tokens(config: Any) -> int:
    return int(getattr(config, "num_virtual_tokens", 0) or 0)


def plan_method(model: nn.Module, method_values: dict, batch_size: int, seq_len: int, bf16: bool,
                baseline_bytes: int) -> MethodPlan:
    """The plan for one method on a (loaded, un-adapted) model; `model` is left untouched."""
    config = config_from_dict(method_values)
    method = get_method(config.method)
    adapted = apply(copy.deepcopy(model), config)
    trainable, total = count_parameters(adapted)
    arch = architecture_of(adapted)
    layers = len(transformer_layers(adapted))
    hidden = adapted.config.hidden_size
    seq = seq_len + virtual_tokens(config)
    per_element = ACTIVATION_BYTES[(arch.family, bf16)]
    activations = layers * batch_size * seq * hidden * per_element
    linear_weights = sum(m.weight.numel() for m in adapted.modules()
                         if isinstance(m, nn.Linear) and m.weight.dim() == 2)
    cast_copies = 2 * linear_weights if bf16 else 0
    if arch.is_decoder and getattr(adapted.config, "vocab_size", 0):
        activations += min(batch_size * seq, LOGIT_CHUNK_ROWS) * adapted.config.vocab_size * 4 * 2
    weight_bytes = sum(p.numel() * p.element_size() for p in adapted.parameters())
    gradients = 4 * trainable
    optimizer = 8 * trainable
    # the delta's own tensors are new memory on top of the loaded base
    delta_weights = 0 if config.method == "full" else 4 * (total - count_parameters(model)[1])
    peak = (baseline_bytes + delta_weights + gradients + optimizer + activations + cast_copies
            + RUNTIME_ALLOWANCE_BYTES)
    file_bytes = weight_bytes if config.method == "full" else _delta_file_bytes(adapted, method)
    return MethodPlan(
        method=config.method, trainable_params=trainable, total_params=total,
        trainable_share=trainable / total, weights_bytes=weight_bytes, gradient_bytes=gradients,
        optimizer_bytes=optimizer, activation_bytes=activations + cast_copies,
        baseline_bytes=baseline_bytes, predicted_peak_bytes=int(peak),
        predicted_file_bytes=int(file_bytes))


def _delta_file_bytes(adapted: nn.Module, method) -> int:
    from .methods.base import delta_state

    name = delta_state(adapted).active
    tensors = method.state_dict(adapted, name)
    return sum(t.numel() * t.element_size() for t in tensors.values()) + 4096  # + header/config


def current_rss() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


def longest_training_row(run_config: Any, tokenizer: Any) -> int:
    """The longest training example in tokens: batches are padded to their longest row, so the
    step that holds the most activations is the one with this row (not always max_length)."""
    from .data import build_dataset

    data = run_config.data
    if data.train is None:
        return data.max_length
    if data.packing:
        return data.max_length
    dataset = build_dataset(data, tokenizer, run_config.task, "train", run_config.train.seed)
    return max((len(example.input_ids) for example in dataset), default=data.max_length)


def plan_methods(run_config: Any, methods: list[str],
                 per_method: dict[str, dict] | None = None) -> list[MethodPlan]:
    """Plans for several methods on the run's model, data shape and batch size."""
    from . import train as _train  # noqa: F401  (training imports count toward the baseline)
    from .models import load_model
    from .optimization import resolve_bf16

    num_labels = run_config.num_labels or (len(run_config.data.label_names)
                                           if run_config.data.label_names else 2)
    model, tokenizer = load_model(run_config.model, task=run_config.task,
                                  num_labels=num_labels if run_config.task == "classification" else None)
    seq_len = longest_training_row(run_config, tokenizer)
    baseline = current_rss()
    bf16 = resolve_bf16(run_config.train.bf16, torch.device("cpu"))
    plans = []
    for name in methods:
        values = {"name": name, **((per_method or {}).get(name, {}).get("method", {}))}
        if name == (run_config.method or {}).get("name"):
            values = {**run_config.method, **values}
        batch = (per_method or {}).get(name, {}).get("train", {}).get("batch_size",
                                                                       run_config.train.batch_size)
        plans.append(plan_method(model, values, batch, seq_len, bf16, baseline))
    return plans


def format_plans(plans: list[MethodPlan]) -> str:
    mb = 1024 * 1024
    header = (f"{'method':8s} {'trainable':>12s} {'share':>7s} {'grads MB':>9s} {'optim MB':>9s} "
              f"{'activ. MB':>9s} {'peak MB':>8s} {'file MB':>8s}")
    rows = [header, "-" * len(header)]
    for p in plans:
        rows.append(f"{p.method:8s} {p.trainable_params:>12,d} {100 * p.trainable_share:>6.2f}% "
                    f"{p.gradient_bytes / mb:>9.1f} {p.optimizer_bytes / mb:>9.1f} "
                    f"{p.activation_bytes / mb:>9.1f} {p.predicted_peak_bytes / mb:>8.0f} "
                    f"{p.predicted_file_bytes / mb:>8.2f}")
    return "\n".join(rows)


def plan_from_config(config_path: str, overrides: list[str], methods: str | None = None) -> list[dict]:
    from .compare import read_compare_config

    run_config, settings = read_compare_config(config_path, overrides)
    names = methods.split(",") if methods else settings["methods"]
    plans = plan_methods(run_config, names, settings["per_method"])
    print(format_plans(plans))
    return [asdict(p) for p in plans]
