"""Predict, before training, what each method will cost: parameters, memory and file size.

The prediction adds, to the memory the process already holds once the model is loaded (measured,
not guessed: the interpreter, torch, the weights), what training adds on top:

    the delta's own weights; gradients (4 B) and AdamW's two fp32 moments (8 B) per trainable
        parameter
    activations kept for backward, *measured*: the trainer's heaviest batch (found by replaying
        its seeded batch order over the run's real examples, padded or padding-free exactly as
        the trainer will batch them for this method) goes once through the adapted model's
        forward and loss under the trainer's autocast, and every tensor autograd saves for
        backward is counted (parameters excluded, shared storage once). What a method saves
        differs a lot: a frozen linear layer keeps nothing, a LoRA-wrapped or fully trained one
        keeps its input, prompt methods lengthen every row, padded batches pay for their padding.
        Plus the inputs that bitsandbytes' 8-bit layers keep as an autograd-context attribute
        (ctx.A) on CPU, out of the hooks' sight; counted once (see plan_method)
    the LM head's logits for one chunk of labelled rows (never the whole batch x seq x vocab),
        once: a chunk (200 MB for a 49k vocabulary) is above glibc's largest mmap threshold
        (32 MB), so it gets its own mapping and goes back to the OS when freed
    the allocator's share: glibc's heap is a ratchet. Training steps leave small long-lived
        blocks among the ones their activations used, so the heap cannot shrink, and a batch
        finds in it holes sized for earlier batches' tensors, of which it fills only about half
        (REUSABLE_SHARE); what more it needs comes from fresh pages. allocator_fill walks that
        over the run's replayed batch order: the heap starts at one batch's demand and tends to
        twice the heaviest's: fill 0.99 on compare-smollm2's 63 padding-free steps, 0.76-0.88
        on the 4-14-step QLoRA benchmark runs. The saved activations count
        1 + (RETENTION[method] - 1) x fill times: RETENTION is the saturated factor, which
        depends on the method (full fine-tuning's big long-lived buffers leave the heap little
        to keep; LoRA keeps the most)
    a runtime allowance: evaluation, checkpoint buffers, the per-step creep of small blocks
(calibrated on measured runs and per-step heap traces, benchmarks/memory/memory_trace.py: README
"plan vs measured").

`compare` prints the prediction beside the measured peak, so the estimate is checked on every run.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch
from torch import nn

from deltatune.config.run import RunConfig, TrainConfig
from deltatune.deltas import apply
from deltatune.methods import config_from_dict, get_method
from deltatune.methods.base import count_parameters
from deltatune.compare.activations import (LOGIT_COPIES, activation_terms, logit_bytes,  # noqa: F401
                                           measure_saved, saved_bytes_by_kind,
                                           saved_for_backward_bytes, step_activation_bytes)
from deltatune.models import release_freed_memory

# Peak RSS above the other terms, per byte of saved activations, once glibc's heap has ratcheted
# to its limit (see allocator_fill): glibc keeps blocks freed by earlier steps (with
# MALLOC_MMAP_THRESHOLD_=65536 a forward grew RSS by exactly the counted bytes). Fitted per method
# on `deltatune compare` runs of examples/demo-compare-minilm.yaml and
# examples/compare-smollm2.yaml (README "plan vs measured").
# Full fine-tuning's large long-lived gradient and optimizer buffers leave the allocator little
# to keep; LoRA keeps the most. Other methods get DEFAULT_RETENTION. adapter, prompt, prefix and
# ptuning fitted on both configs' runs with the current allocator code, whose
# saturated factors agreed within 5% (MiniLM / SmolLM2: adapter 2.16 / 2.33 (SmolLM2 from an
# earlier run), prompt 1.98 / 2.07, ptuning 1.96 / -;
# prefix 1.57 / 1.80, within 14%).
# ln-tuning and bitfit keep the default (-3% and -8% on a MiniLM demo-budget comparison; ln-tuning
# -7% on the SmolLM2 one).
# The families that wrap linear layers like LoRA: fitted on the SmolLM2 comparison of
# examples/compare-smollm2.yaml (saturated factors OFT 1.96, BOFT 1.82, LoHa 1.72, LoKr 1.92,
# VeRA 2.06, AdaLoRA 2.12 beside LoRA's 2.07) and the MiniLM demo run (2.0-2.55), and set between
# the two so that both configs plan within 15% (with LoRA's 2.3, BOFT and LoHa planned 18% and 24%
# high on SmolLM2; why their heaps keep less was not traced).
RETENTION = {"full": 1.1, "lora": 2.3, "adapter": 2.2, "prompt": 2.0, "ptuning": 2.0,
             "prefix": 1.65, "vera": 2.2, "adalora": 2.5,
             "oft": 2.3, "boft": 2.0, "loha": 2.0, "lokr": 2.1}
DEFAULT_RETENTION = 1.6
# The share of the held heap a training batch can reuse (allocator_fill), fitted to per-step
# traces of the heap (benchmarks/memory/memory_trace.py; SmolLM2 LoRA 14 and 30 steps, QLoRA 14 steps:
# 0.42-0.50; README "plan vs measured").
REUSABLE_SHARE = 0.5
RUNTIME_ALLOWANCE_BYTES = 250 * 1024 * 1024
# At most this many batches of the run are replayed to find the heaviest (lengths only: cheap).
MAX_REPLAYED_BATCHES = 100_000


@dataclass
class MethodPlan:
    method: str
    trainable_params: int
    total_params: int
    trainable_share: float
    weights_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int         # live: saved for backward at the heaviest step, plus logits
    baseline_bytes: int          # what the process holds with the model loaded (measured)
    predicted_peak_bytes: int
    predicted_file_bytes: int
    heaviest_batch_tokens: int = 0  # tokens the layers compute at that step (padding included)
    total_steps: int = 0            # optimizer steps the run will take (compare's ETA uses it)
    quantize: str = "none"          # the base's quantization (a `lora@nf4` comparison row)
    base_weight_bytes: int = 0      # the base's weights as loaded, predicted from its shapes
    allocator_fill: float = 0.0     # how far the batch sequence ratchets the heap (0..1)
    logit_bytes: int = 0            # the LM head's logits chunk, part of activation_bytes


def current_rss() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


# ------------------------------------------------------------------------------ the heaviest step
def step_costs(dataset: Any, train: TrainConfig, collator: Any) -> tuple[Any, list[int]]:
    """(the run's batch stream, the tokens its layers compute at each batch, in training order),
    replayed from the trainer's own batch stream (a pure function of seed and batch index)."""
    from deltatune.training.batching import training_stream

    stream, steps = training_stream(dataset, train, collator)
    lengths = [len(e.input_ids) for e in dataset]

    def cost(rows: list[int]) -> int:  # padding-free: the sum; padded: rows x the longest row
        sizes = [lengths[i] for i in rows]
        return sum(sizes) if collator.packing else len(sizes) * max(sizes)

    batches = min(steps * train.grad_accum, MAX_REPLAYED_BATCHES)
    return stream, [cost(stream.rows(k)) for k in range(batches)]


def allocator_fill(costs: list[int], reusable: float = REUSABLE_SHARE) -> float:
    """How far the run's batch sequence drives glibc's heap toward its limit: 0 when the first
    batch is the heaviest and nothing follows, near 1 after a few dozen batches of similar size.

    glibc never hands back a heap block that lies below a live one, and every training step
    leaves small long-lived allocations (optimizer state, kernel caches, Python objects) among
    the blocks its activations used, so the heap is a ratchet. A batch finds in it holes sized
    for earlier batches' tensors, of which it can fill only a share (`reusable`); whatever more
    its activations need comes from fresh pages: heap <- max(heap, (1 - reusable) * heap +
    demand), demand proportional to the batch's tokens. Walked over the replayed batch order,
    the heap starts at the first batch's demand and tends to 1 / reusable times the heaviest
    batch's; the fill is the share of that extra which the run reaches."""
    heaviest = max(costs, default=0)
    if heaviest <= 0:
        return 0.0
    heap = 0.0
    for cost in costs:
        heap = max(heap, (1 - reusable) * heap + cost / heaviest)
    return min(1.0, (heap - 1) / (1 / reusable - 1))


def heaviest_batch(dataset: Any, train: TrainConfig, collator: Any,
                   replayed: tuple[Any, list[int]] | None = None) -> dict:
    """The collated batch of the run that makes its layers compute the most tokens
    (`replayed`: step_costs' result when the caller has it)."""
    stream, costs = replayed or step_costs(dataset, train, collator)
    heaviest = max(range(len(costs)), key=costs.__getitem__)
    return collator([dataset[i] for i in stream.rows(heaviest)])


# ------------------------------------------------------------------------------------- per method
def plan_method(model: nn.Module, method_values: dict, dataset: Any, pad_token_id: int | None,
                run_config: RunConfig, train: TrainConfig, baseline_bytes: int, world_size: int = 1,
                distributed: str = "ddp") -> MethodPlan:
    """The plan for one method on a (loaded, un-adapted) model; `model` is left untouched.
    world_size > 1: what each process holds under `distributed` (ddp | fsdp)."""
    from deltatune.training.optimization import resolve_bf16
    from deltatune.training.batching import training_collator, training_stream
    from deltatune.training.levers import set_attention

    config = config_from_dict(method_values)
    method = get_method(config.method)
    row = method_values.get("name", config.method)  # a variant ("dora") gets its own row
    adapted = apply(copy.deepcopy(model), config)
    set_attention(adapted, getattr(train, "attention", "auto"))  # before the collator: it asks
    trainable, total = count_parameters(adapted)
    task = run_config.task
    collator = training_collator(adapted, pad_token_id or 0, task, run_config.data, train)
    stream, costs = step_costs(dataset, train, collator)
    batch = heaviest_batch(dataset, train, collator, (stream, costs))
    total_steps = training_stream(dataset, train, collator)[1]
    tokens = int(batch["input_ids"].numel())
    bf16 = resolve_bf16(train.bf16, torch.device("cpu"))
    measured, logits = activation_terms(adapted, task, batch, train, collator.packing, bf16)
    hidden = int(getattr(adapted.config, "hidden_size", 0) or 0)
    activations = step_activation_bytes(measured, tokens, hidden, logits, 1.0, train)
    # The heap keeps up to RETENTION[method] times the saved activations, as far as this run's
    # batch sequence ratchets it (allocator_fill). The logits chunk (200 MB for a 49k vocabulary)
    # is above glibc's largest mmap threshold (32 MB): mapped on its own and unmapped when freed,
    # it counts once. So do the inputs an 8-bit layer keeps (kept_inputs): every forward makes
    # those tensors anyway (a dense or 4-bit layer frees them at once), so keeping them until
    # backward adds their bytes to the step's peak but no new sizes to the heap's churn
    # (SmolLM2 at 8 x 512: int8 grows 0.95 GB more than nf4 in training, README).
    # Under gradient checkpointing step_activation_bytes applies the factor to the moment's own
    # activations (one layer recomputed, the loss's rows), not to the layers' kept inputs.
    fill = allocator_fill(costs)
    retention = 1 + (RETENTION.get(row, RETENTION.get(config.method, DEFAULT_RETENTION)) - 1) * fill
    weight_bytes = sum(p.numel() * p.element_size() for p in adapted.parameters())
    gradients = 4 * trainable
    optimizer = 8 * trainable
    peak = (fixed_bytes(model, adapted, config.method, baseline_bytes)
            + step_activation_bytes(measured, tokens, hidden, logits, retention, train))
    file_bytes = weight_bytes if config.method == "full" else _delta_file_bytes(adapted, method)
    plan = MethodPlan(
        method=row, trainable_params=trainable, total_params=total,
        trainable_share=trainable / total, weights_bytes=weight_bytes, gradient_bytes=gradients,
        optimizer_bytes=optimizer, activation_bytes=activations, baseline_bytes=baseline_bytes,
        predicted_peak_bytes=int(peak), predicted_file_bytes=int(file_bytes),
        heaviest_batch_tokens=tokens, total_steps=total_steps, allocator_fill=fill,
        logit_bytes=logits)
    if world_size > 1:
        from deltatune.compare.world_plan import per_process

        base = sum(p.numel() * p.element_size() for p in model.parameters())
        blended = (step_activation_bytes(measured, tokens, hidden, logits, retention, train)
                   / max(activations, 1))  # per byte
        plan = per_process(plan, adapted, base, world_size, distributed, bf16, blended,
                           RUNTIME_ALLOWANCE_BYTES, train.grad_accum)
    return plan


def fixed_bytes(model: nn.Module, adapted: nn.Module, method: str, baseline_bytes: int) -> int:
    """What a method's training holds whatever the batch: the process with the base loaded,
    the delta's own weights (new memory on top of the base), gradients (4 B) and AdamW's two
    fp32 moments (8 B) per trainable parameter, and the runtime allowance."""
    trainable, total = count_parameters(adapted)
    delta_weights = 0 if method == "full" else 4 * (total - count_parameters(model)[1])
    return baseline_bytes + delta_weights + 12 * trainable + RUNTIME_ALLOWANCE_BYTES


def _delta_file_bytes(adapted: nn.Module, method) -> int:
    from deltatune.methods.base import delta_state

    name = delta_state(adapted).active
    tensors = method.state_dict(adapted, name)
    if method.export_form is not None:  # as save_adapter writes it (PiSSA/OLoRA: rank 2r)
        config = delta_state(adapted).configs[name]
        tensors, _ = method.export_form(adapted, name, tensors, method.to_peft(config, adapted, name))
    return sum(t.numel() * t.element_size() for t in tensors.values()) + 4096  # + header/config


def plan_methods(run_config: RunConfig, methods: list[str],
                 per_method: dict[str, dict] | None = None, world_size: int = 1,
                 distributed: str = "ddp") -> list[MethodPlan]:
    """Plans for several methods on the run's model, its real training rows and batch order."""
    from deltatune.training import loop as _train  # noqa: F401  (training imports count toward the baseline)
    from deltatune.data.dataset import build_dataset, classes_of_training_file
    from deltatune.errors import DeltatuneError
    from deltatune.models import load_model

    from deltatune.compare.settings import row_settings, split_row

    if run_config.data.train is None:
        raise DeltatuneError("plan: data.train is not set (the plan replays the training rows)")
    num_labels = run_config.num_labels
    if run_config.task == "classification" and not num_labels:
        num_labels = classes_of_training_file(run_config.data)  # as training will find them
    process_bytes = current_rss()
    # Rows on one base share one load; `lora@nf4` rows get the base quantized as they train on it.
    groups: list[tuple[Any, list[str]]] = []
    for row in methods:
        quantize = split_row(row)[1] or run_config.quantize
        rows = next((g for q, g in groups if q == quantize), None)
        if rows is None:
            groups.append((quantize, rows := []))
        rows.append(row)
    plans: dict[str, MethodPlan] = {}
    for quantize, rows in groups:
        before = current_rss()
        model, tokenizer = load_model(run_config.model, task=run_config.task, quantize=quantize,
                                      num_labels=num_labels if run_config.task == "classification" else None)
        touch_weights(model)
        # what this base adds to the process (another group's freed base no longer counts)
        baseline = process_bytes + max(0, current_rss() - before)
        base_bytes = predicted_base_bytes(model)
        datasets: dict[str, Any] = {}
        for row in rows:
            name = split_row(row)[0]
            own = row_settings(per_method or {}, row)
            values = {"name": name, **own.get("method", {})}
            if name == (run_config.method or {}).get("name"):
                values = {**run_config.method, **values}
            train = dataclasses.replace(run_config.train, **own.get("train", {}))
            data = dataclasses.replace(run_config.data, **own.get("data", {}))
            key = repr(sorted(own.get("data", {}).items()))
            if key not in datasets:
                datasets[key] = build_dataset(data, tokenizer, run_config.task, "train", train.seed,
                                              num_labels)
            plan = plan_method(model, values, datasets[key], tokenizer.pad_token_id,
                               dataclasses.replace(run_config, data=data), train, baseline,
                               world_size, distributed)
            plans[row] = dataclasses.replace(plan, method=row, quantize=str(quantize),
                                             base_weight_bytes=base_bytes)
        del model, datasets
        release_freed_memory()
    return [plans[row] for row in methods]


def touch_weights(model: nn.Module) -> None:
    """Read every weight page once, as training will (weights load memory-mapped), except an input
    embedding load_model left on its file's map: training reads only the rows it looks up there."""
    lookup_only = None
    if getattr(model, "deltatune_embedding_mapped", False):
        lookup_only = model.get_input_embeddings().weight
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter is not lookup_only:
                parameter.sum()


def predicted_base_bytes(model: nn.Module) -> int:
    """The base's weight bytes as `quantized_bytes.predicted_weight_bytes` predicts them from the
    model's shapes (the same numbers a model too big to load here would get)."""
    from deltatune.models import architecture_of
    from deltatune.compare.quantized_bytes import predicted_weight_bytes
    from deltatune.quantization import quantization_of

    with torch.device("meta"):
        skeleton = type(model)(copy.deepcopy(model.config))
    dtype = model.get_input_embeddings().weight.dtype
    return predicted_weight_bytes(skeleton, architecture_of(model).layers, quantization_of(model), dtype)


def format_plans(plans: list[MethodPlan]) -> str:
    mb = 1024 * 1024
    header = (f"{'method':8s} {'trainable':>12s} {'share':>7s} {'base MB':>8s} {'grads MB':>9s} {'optim MB':>9s} "
              f"{'activ. MB':>9s} {'tokens':>7s} {'peak MB':>8s} {'file MB':>8s}")
    rows = [header, "-" * len(header)]
    for p in plans:
        rows.append(f"{p.method:8s} {p.trainable_params:>12,d} {100 * p.trainable_share:>6.2f}% "
                    f"{p.base_weight_bytes / mb:>8.1f} "
                    f"{p.gradient_bytes / mb:>9.1f} {p.optimizer_bytes / mb:>9.1f} "
                    f"{p.activation_bytes / mb:>9.1f} {p.heaviest_batch_tokens:>7d} "
                    f"{p.predicted_peak_bytes / mb:>8.0f} {p.predicted_file_bytes / mb:>8.2f}")
    rows.append(f"(baseline with the model loaded: {plans[0].baseline_bytes / mb:.0f} MB; "
                f"activations measured on each method's heaviest training batch)" if plans else "")
    return "\n".join(rows)


def plan_from_config(config_path: str, overrides: list[str], methods: str | None = None,
                     world_size: int = 1, distributed: str = "ddp", as_json: bool = False) -> list[dict]:
    from deltatune.compare.settings import read_compare_config
    from deltatune.errors import DeltatuneError

    if world_size < 1:
        raise DeltatuneError(f"--world-size: must be >= 1, got {world_size}")
    run_config, settings = read_compare_config(config_path, overrides)
    names = methods.split(",") if methods else settings["methods"]
    per_method = settings["per_method"]
    search = settings["search"]
    if search:  # each method's heaviest searched configuration: the memory its worst trial needs
        from deltatune.compare.search import read_search, trials_for
        from deltatune.compare.settings import row_method_options, row_settings
        from deltatune.compare.space import heaviest

        if methods:
            search = read_search((run_config.compare or {}).get("search"), names,
                                 row_method_options(run_config, per_method, names))
        per_method = {k: {s: dict(v) for s, v in values.items()} for k, values in per_method.items()}
        picked = []
        for row in names:
            heavy = heaviest(search["spaces"].get(row, {}))
            if heavy:
                own = row_settings(per_method, row)
                per_method[row] = {**own, "method": {**own.get("method", {}), **heavy}}
                picked.append(f"{row} " + ", ".join(f"{k}={v}" for k, v in heavy.items()))
        print(f"search: {sum(trials_for(search, row) for row in names)} trials "
              f"({', '.join(f'{row} {trials_for(search, row)}' for row in names)}); memory below is "
              f"for each method's heaviest searched configuration"
              + (f" ({'; '.join(picked)})" if picked else ""),
              file=sys.stderr if as_json else sys.stdout)  # --json: stdout is the JSON alone
    plans = plan_methods(run_config, names, per_method, world_size, distributed)
    if as_json:
        import json

        for p in plans:
            print(json.dumps({**asdict(p), "peak_mb": round(p.predicted_peak_bytes / 2**20, 1)}))
        return [asdict(p) for p in plans]
    if world_size > 1:
        print(f"per process, {world_size} processes, {distributed} (batch_size is the global batch):")
    print(format_plans(plans))
    return [asdict(p) for p in plans]
