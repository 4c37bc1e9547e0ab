"""The training loop. It knows no method: it trains whatever `requires_grad` after `apply`.

    summary = train_from_config("examples/sst2-minilm-lora.yaml", ["method.r=16"])
    summary = train(model, tokenizer, run_config)          # a model you loaded and applied

One optimizer step = `grad_accum` global batches of `batch_size` rows (split over the ranks
under torchrun). The loss is the mean over every target of the step — summed per micro-batch and
divided by the step's global target count — so grad_accum and the number of processes change
the arithmetic, not the result. The run is written to a hidden `.NAME.partial/` directory beside
output_dir and renamed to output_dir only when complete; checkpoints live inside it.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from deltatune.training.checkpoints import (capture_rng, load_latest_checkpoint, restore_rng, rng_from_bytes,
                         rng_to_bytes, save_checkpoint)
from deltatune.deltas import active_config
from deltatune.training.distributed import Distributed, setup_distributed, teardown_distributed
from deltatune.errors import DeltatuneError
from deltatune.training.evaluation import default_metric, evaluate_model, is_better
from deltatune.training.losses import batch_loss, count_targets
from deltatune.methods import default_lr_for
from deltatune.methods.base import count_parameters
from deltatune.training.packed_attention import ONE_ROW, packed_attention, supports_packed_attention
from deltatune.training.optimization import (BatchStream, build_optimizer, build_scheduler,
                           enable_gradient_checkpointing, resolve_bf16, set_seed,
                           trainable_parameters)
from deltatune.training.hardware import bf16_warning
from deltatune.training.progress import RunLog
from deltatune.training.speed import hold_frozen_weights_in_bf16
from deltatune.training.run_dir import check_output_dir, finish_run_dir, prepare_run_dir, write_summary


@dataclass
class Progress:
    """Where a run is; saved in every checkpoint."""

    step: int = 0                 # optimizer steps done
    batch: int = 0                # global batches consumed (the data position)
    best_metric: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    train_tokens: int = 0
    train_seconds: float = 0.0
    stopped_early: bool = False


def _tokens(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def training_collator(model: nn.Module, pad_token_id: int | None, task: str, data: Any,
                      tc: Any) -> Collator:
    """How the trainer batches rows for this (adapted) model. Padding-free (causal LM): a
    batch's examples are laid end to end in one row and each attends only to itself
    (packed_attention), so no layer computes a padding token."""
    from deltatune.data.dataset import Collator

    padding_free = (task == "causal-lm" and getattr(tc, "padding_free", True)
                    and not data.packing and supports_packed_attention(model))
    return Collator(pad_token_id, packing=data.packing or padding_free,
                    max_length=ONE_ROW if padding_free else data.max_length)


def training_stream(dataset: Any, tc: Any, collator: Collator,
                    world_size: int = 1) -> tuple[BatchStream, int]:
    """The run's batch order (rows grouped by length unless packed) and its number of steps."""
    grouped = getattr(tc, "group_by_length", True) and not collator.packing
    stream = BatchStream(len(dataset), tc.batch_size, tc.seed, world_size,
                         [len(e.input_ids) for e in dataset] if grouped else None)
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * stream.per_epoch / tc.grad_accum))
    return stream, total_steps


def train(model: nn.Module, tokenizer: Any, config: Any, *, train_dataset=None, eval_dataset=None,
          resume: bool = False, overwrite: bool = False, dist: Distributed | None = None,
          on_step: Callable[[int], None] | None = None, started: float | None = None) -> dict:
    """Train `model` (a method already applied) as `config` (a RunConfig) says; returns the
    summary that is also written to output_dir/summary.json.

    `on_step(step)` is called after every optimizer step (and its checkpoint); raising from it
    interrupts the run as a crash would, leaving the checkpoints for `resume=True`.
    """
    from deltatune.data.dataset import Collator, build_dataset

    started = started or time.time()
    dist = dist or setup_distributed()
    tc, task = config.train, config.task
    final_dir = Path(config.output_dir)
    run_dir = prepare_run_dir(final_dir, resume, overwrite, dist)
    num_labels = getattr(model.config, "num_labels", None) if task == "classification" else None
    if train_dataset is None:
        train_dataset = build_dataset(config.data, tokenizer, task, "train", tc.seed, num_labels)
    if eval_dataset is None and config.data.eval:
        eval_dataset = build_dataset(config.data, tokenizer, task, "eval", tc.seed, num_labels)
    if len(train_dataset) == 0:
        raise DeltatuneError(f"{config.data.train}: the training set is empty")
    collator = training_collator(model, tokenizer.pad_token_id, task, config.data, tc)
    eval_collator = Collator(tokenizer.pad_token_id)

    bare = model.to(dist.device)
    if tc.gradient_checkpointing:
        enable_gradient_checkpointing(bare)
    name, method_config = active_config(bare)
    lr = tc.lr or default_lr_for(method_config)
    stream, total_steps = training_stream(train_dataset, tc, collator, dist.world_size)
    warmup_steps = math.ceil(tc.warmup_ratio * total_steps)
    optimizer = build_optimizer(bare, lr, tc.weight_decay)
    scheduler = build_scheduler(optimizer, tc.schedule, warmup_steps, total_steps)
    trainable = [p for _, p in trainable_parameters(bare)]
    progress = Progress()
    set_seed(tc.seed)
    damaged: list[str] = []  # newer checkpoints that did not load (resume uses an older one)
    if resume:
        checkpoint, state, damaged = load_latest_checkpoint(run_dir, bare, optimizer, scheduler)
        progress = Progress(**state["progress"])
        rng = state["rng"]
        restore_rng(rng[dist.rank] if len(rng) == dist.world_size else rng[0])
    elif dist.is_main:
        from deltatune.config.run import save_run_config

        save_run_config(config, run_dir / "config.yaml")

    ddp = bare
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(bare, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    bf16 = dist.broadcast(resolve_bf16(tc.bf16, dist.device))  # ranks agree even if probes differ
    autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=bf16)
    metric = tc.metric or default_metric(task)
    log = RunLog(run_dir, total_steps, progress.step, enabled=dist.is_main)
    if dist.is_main and (slow_bf16 := bf16_warning(tc.bf16, dist.device)):
        log.message(slow_bf16)
    for problem in damaged:
        log.message(f"skipped a damaged checkpoint ({problem}); resuming from {checkpoint.name}")
    eval_kwargs = dict(batch_size=tc.eval_batch_size or tc.batch_size, dist=dist, bf16=bf16,
                       tokenizer=tokenizer)
    window_loss, window_steps, window_tokens, window_seconds = 0.0, 0, 0, 0.0

    def run_eval(final: bool) -> dict[str, float]:
        with_em = metric == "exact_match" or (final and config.data.format == "gsm8k")
        metrics = evaluate_model(bare, eval_dataset, task, eval_collator,
                                 with_exact_match=with_em, **eval_kwargs)
        log.log({"step": progress.step, **{f"eval_{k}": v for k, v in metrics.items()}})
        if metric not in metrics:
            raise DeltatuneError(f"train.metric: {metric!r} is not computed for task {task!r} "
                                 f"(available: {', '.join(k for k in metrics if k != 'examples')})")
        if is_better(metric, metrics[metric], progress.best_metric):
            progress.best_metric, progress.best_step = metrics[metric], progress.step
            progress.evals_since_best = 0
            if tc.eval_every and dist.is_main:
                from deltatune.adapters_io import save_adapter

                save_adapter(bare, run_dir / "best")
        else:
            progress.evals_since_best += 1
        log.message(f"step {progress.step}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if k != "examples"))
        return metrics

    bare.train()
    try:
        while progress.step < total_steps and not progress.stopped_early:
            tick = time.perf_counter()
            batches = [collator([train_dataset[i] for i in dist.shard(stream.rows(progress.batch + k))])
                       for k in range(tc.grad_accum)]
            tokens = sum(_tokens(b) for b in batches)
            counts = dist.all_reduce_sum(torch.tensor(
                [sum(count_targets(task, b["labels"]) for b in batches), tokens], dtype=torch.float64))
            targets, tokens = float(counts[0]), int(counts[1])
            step_loss = torch.zeros((), dtype=torch.float64)
            for k, batch in enumerate(batches):
                batch = {key: value.to(dist.device) for key, value in batch.items()}
                last = k == len(batches) - 1
                # DDP syncs gradients on the last micro-batch only.
                sync = ddp.no_sync() if dist.enabled and not last else contextlib.nullcontext()
                # Backward too: gradient checkpointing re-runs the attention there.
                attention = packed_attention(bare) if collator.packing else contextlib.nullcontext()
                with sync, attention:
                    with autocast:
                        loss = batch_loss(ddp, task, batch, head_owner=bare)
                    (loss * (dist.world_size / max(targets, 1.0))).backward()
                step_loss += loss.detach().double().cpu()
            step_loss = float(dist.all_reduce_sum(step_loss)) / max(targets, 1.0)
            # With max_grad_norm None the norm is still measured (logged, and checked for nan).
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, tc.max_grad_norm or math.inf)
            finite = math.isfinite(step_loss) and bool(torch.isfinite(grad_norm))
            lr_now = scheduler.get_last_lr()[0]
            if finite:
                optimizer.step()
            elif tc.on_nan == "stop":
                raise DeltatuneError(f"step {progress.step + 1}: the loss is {step_loss} (grad norm "
                                     f"{float(grad_norm)}); "
                                     "lower train.lr, or set train.on_nan=skip to skip such steps")
            else:
                log.message(f"step {progress.step + 1}: non-finite loss, step skipped")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.batch += tc.grad_accum
            seconds = time.perf_counter() - tick
            progress.train_seconds += seconds
            progress.train_tokens += tokens
            if finite:
                window_loss, window_steps = window_loss + step_loss, window_steps + 1
            window_tokens, window_seconds = window_tokens + tokens, window_seconds + seconds
            log.advance(step_loss if finite else None, tokens / seconds if seconds else None)
            if progress.step % tc.log_every == 0 or progress.step == total_steps:
                log.log({"step": progress.step, "epoch": round(progress.batch / stream.per_epoch, 4),
                         "loss": window_loss / max(window_steps, 1), "lr": lr_now,
                         "grad_norm": float(grad_norm),
                         "tokens_per_s": window_tokens / max(window_seconds, 1e-9),
                         "elapsed_s": round(time.time() - started, 2)})
                window_loss, window_steps, window_tokens, window_seconds = 0.0, 0, 0, 0.0
            if (eval_dataset is not None and tc.eval_every and progress.step % tc.eval_every == 0
                    and progress.step < total_steps):
                run_eval(final=False)
                bare.train()
                if tc.early_stopping_patience and progress.evals_since_best >= tc.early_stopping_patience:
                    progress.stopped_early = True
                    log.message(f"early stopping at step {progress.step}: no better {metric} in "
                                f"{tc.early_stopping_patience} evaluations")
            if tc.save_every and progress.step % tc.save_every == 0:
                rng = [rng_from_bytes(b) for b in dist.gather(rng_to_bytes(capture_rng()))]
                if dist.is_main:
                    save_checkpoint(run_dir, progress.step, bare, optimizer, scheduler,
                                    {"progress": asdict(progress), "rng": rng}, tc.keep_checkpoints)
                dist.barrier()
            if on_step is not None:
                on_step(progress.step)
        final_metrics = run_eval(final=True) if eval_dataset is not None else {}
    finally:
        log.close()
    bare.eval()
    in_sync = _ranks_in_sync(trainable, dist)
    summary = None
    if dist.is_main:
        trainable_count, total_count = count_parameters(bare)
        summary = write_summary(run_dir, bare, tokenizer, config, {
            "trainable_params": trainable_count, "total_params": total_count,
            "trainable_percent": round(100 * trainable_count / max(total_count, 1), 4),
            "lr": lr, "bf16": bf16, "world_size": dist.world_size,
            "steps": progress.step, "total_steps": total_steps,
            "epochs": round(progress.batch / stream.per_epoch, 4),
            "train_examples": len(train_dataset),
            "truncated_train_rows": getattr(train_dataset, "stats", {}).get("truncated"),
            "eval_examples": len(eval_dataset) if eval_dataset is not None else 0,
            "train_time_s": round(progress.train_seconds, 3),
            "time_per_step_s": round(progress.train_seconds / max(progress.step, 1), 4),
            "tokens_per_s": round(progress.train_tokens / max(progress.train_seconds, 1e-9), 1),
            "final_eval": final_metrics, "metric": metric,
            "best": {"metric": metric, "value": progress.best_metric, "step": progress.best_step},
            "stopped_early": progress.stopped_early, "ranks_in_sync": in_sync,
        }, started, dist.device)
    dist.barrier()
    finish_run_dir(run_dir, final_dir, dist)
    return dist.broadcast(summary)


def _ranks_in_sync(trainable: list[torch.Tensor], dist: Distributed) -> bool | None:
    """DDP keeps every rank's weights bit-identical; check it (cheaply) instead of assuming it."""
    if not dist.enabled:
        return None
    with torch.no_grad():
        checksum = [float(p.double().sum()) for p in trainable] + \
                   [float(p.double().square().sum()) for p in trainable]
    sums = dist.gather(checksum)
    if any(s != sums[0] for s in sums):
        raise DeltatuneError("distributed training diverged: the ranks' weights differ at the end")
    return True


def train_from_config(config_path: str, overrides: list[str] | tuple[str, ...] = (),
                      resume: bool = False, overwrite: bool = False,
                      on_step: Callable[[int], None] | None = None) -> dict:
    """`deltatune train CONFIG.yaml [key=value ...]`: load, apply the method, train, evaluate,
    save. Under torchrun every rank runs this; rank 0 writes. `on_step`: see `train`."""
    from deltatune.config.run import load_run_config
    from deltatune.data.dataset import build_dataset, num_labels_of
    from deltatune.data.labels import check_label_set
    from deltatune.deltas import apply
    from deltatune.models import load_model

    started = time.time()
    config = load_run_config(config_path, list(overrides))
    method_config = config.method_config()
    check_output_dir(Path(config.output_dir), resume, overwrite)  # fail before loading anything
    dist = setup_distributed()
    finished = False
    try:
        set_seed(config.train.seed)  # the new head / delta initialisation is seeded too
        num_labels = config.num_labels if config.task == "classification" else None
        model, tokenizer = load_model(config.model, task=config.task, num_labels=num_labels,
                                      quantize=config.quantize)
        train_dataset = build_dataset(config.data, tokenizer, config.task, "train",
                                      config.train.seed, num_labels) if config.data.train else None
        if train_dataset is None:
            raise DeltatuneError("data.train: missing (training needs a training file)")
        eval_dataset = None
        if config.task == "classification" and num_labels is None:
            # the classes come from the data: its label set must be 0..K-1, alike in both files
            eval_dataset = (build_dataset(config.data, tokenizer, config.task, "eval",
                                          config.train.seed) if config.data.eval else None)
            check_label_set(train_dataset, eval_dataset)
            found = num_labels_of(train_dataset)
            if found != model.config.num_labels:  # rare: more than two classes, found in the data
                set_seed(config.train.seed)
                model, tokenizer = load_model(config.model, task=config.task, num_labels=found,
                                              quantize=config.quantize)
            config.num_labels = found
        if eval_dataset is None and config.data.eval:
            eval_dataset = build_dataset(config.data, tokenizer, config.task, "eval",
                                         config.train.seed, config.num_labels)
        apply(model, method_config)
        # exact under autocast; this model is ours (speed.py). One process only: sharding (FSDP)
        # wants one dtype per parameter group.
        if config.train.frozen_bf16 and not dist.enabled and resolve_bf16(config.train.bf16, dist.device):
            hold_frozen_weights_in_bf16(model)
        summary = train(model, tokenizer, config, train_dataset=train_dataset,
                        eval_dataset=eval_dataset, resume=resume, overwrite=overwrite, dist=dist,
                        on_step=on_step, started=started)
        finished = True
    finally:
        teardown_distributed(dist, wait=finished)
    if dist.is_main:
        final = summary.get("final_eval") or {}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k not in ("examples",))
        print(f"trained {summary['steps']} steps in {summary['wall_time_s']:.1f} s; "
              f"{shown or 'no eval data'}; saved to {config.output_dir}")
    return summary
