"""The training loop. It knows no method: it trains whatever `requires_grad` after `apply`.

    summary = train_from_config("examples/sst2-minilm-lora.yaml", ["method.r=16"])
    summary = train(model, tokenizer, run_config, method=lora_config)  # a model you loaded and applied

A run's settings arrive as one RunConfig (config/run.py) and, beside it, the validated method
config; each setting is read here or handed on by name (train.lr: `_setup` -> build_optimizer).

One optimizer step = `grad_accum` global batches of `batch_size` rows (split over the ranks
under torchrun). The loss is the mean over every target of the step — summed per micro-batch and
divided by the step's global target count — so grad_accum and the number of processes change
the arithmetic, not the result. The run is written to a hidden `.NAME.partial/` directory beside
output_dir and renamed to output_dir only when complete; checkpoints live inside it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from deltatune.training.checkpoints import (capture_rng, load_latest_checkpoint, restore_rng, rng_from_bytes,
                         rng_to_bytes, save_checkpoint, save_sharded_checkpoint)
from deltatune.config.run import RunConfig, load_run_config, save_run_config
from deltatune.deltas import active_config, after_optimizer_step, training_loss_term
from deltatune.training.batching import batch_tokens, training_collator, training_stream
from deltatune.training.distributed import (Distributed, peer_failures, ranks_in_sync,
                                            setup_distributed, teardown_distributed)
from deltatune.errors import DeltatuneError
from deltatune.training.collapse import did_not_learn, no_information
from deltatune.training.collapse import message as collapse_message
from deltatune.training.evaluation import NOT_SHOWN, default_metric, evaluate_model, is_better
from deltatune.training.losses import batch_loss, count_targets
from deltatune.methods import default_lr_for, lr_multipliers_for, method_config_for
from deltatune.methods.base import MethodConfig, count_parameters
from deltatune.training.packed_attention import packed_attention
from deltatune.training.compiled import compiled_elementwise
from deltatune.training.levers import prepare_levers, step_levers
from deltatune.training.optimization import (build_optimizer, build_scheduler, resolve_bf16,
                                             set_seed, trainable_parameters)
from deltatune.hardware import bf16_warning
from deltatune.training.progress import RunLog
from deltatune.training.run_dir import (check_output_dir, finish_run_dir, partial_dir, peak_memory,
                                        prepare_run_dir, rewrite_summary, run_dir_lock,
                                        write_summary)
from deltatune.training.sharding import build_parallel, describe
from deltatune.training.state import Progress, Run, Window
from deltatune.tracking import check_installed, open_trackers
from deltatune.training.speed import hold_frozen_weights_in_bf16


def train(model: nn.Module, tokenizer: Any, config: RunConfig, *, method: MethodConfig | None = None,
          train_dataset=None, eval_dataset=None, resume: bool = False, overwrite: bool = False,
          dist: Distributed | None = None, on_step: Callable[[int], None] | None = None,
          started: float | None = None) -> dict:
    """Train `model` (a method already applied) as `config` says; returns the summary that is
    also written to output_dir/summary.json.

    `method`: the config the method was applied with (it picks the lr when train.lr is unset);
    None means the model's active delta's config, for a model applied outside this module.

    `on_step(step)` is called after every optimizer step (and its checkpoint); raising from it
    interrupts the run as a crash would, leaving the checkpoints for `resume=True`.
    """
    dist = dist or setup_distributed()
    method = method if method is not None else active_config(model)[1]
    final = Path(config.output_dir)
    with run_dir_lock(final, dist.rank), peer_failures(dist, partial_dir(final)):
        run = _setup(model, tokenizer, config, method, train_dataset, eval_dataset, resume,
                     overwrite, dist, started or time.time())
        return _train(run, on_step)


def _train(run: Run, on_step: Callable[[int], None] | None) -> dict:
    tc, progress = run.tc, run.progress
    run.model.train()
    try:
        while progress.step < run.total_steps and not progress.stopped_early:
            _optimizer_step(run)
            if (run.eval_dataset is not None and tc.eval_every and progress.step % tc.eval_every == 0
                    and progress.step < run.total_steps):
                _evaluate(run, final=False)
                run.model.train()
                _check_early_stopping(run)
            if tc.save_every and progress.step % tc.save_every == 0:
                _checkpoint(run)
            if on_step is not None:
                on_step(progress.step)
        final_metrics = _evaluate(run, final=True) if run.eval_dataset is not None else {}
        if verdict := did_not_learn(progress.evaluations):
            run.log.message(collapse_message(verdict))
    except BaseException:
        run.log.close(failed=True)
        raise
    run.log.close()
    return _finish(run, final_metrics)


def _setup(model: nn.Module, tokenizer: Any, config: RunConfig, method: MethodConfig,
           train_dataset: Any, eval_dataset: Any, resume: bool, overwrite: bool, dist: Distributed,
           started: float) -> Run:
    """Data, run directory, optimizer and schedule; the checkpoint's state when resuming."""
    from deltatune.data.dataset import Collator, build_dataset

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

    bare = model.to(dist.device)
    prepare_levers(bare, tc, dist.device)  # attention, gradient checkpointing (training/levers.py)
    bf16 = dist.broadcast(resolve_bf16(tc.bf16, dist.device))  # ranks agree even if probes differ
    # Before the optimizer: under fsdp it must see the sharded parameters.
    parallel = build_parallel(bare, dist, getattr(tc, "distributed", "auto"), bf16=bf16,
                              cpu_offload=getattr(tc, "fsdp_cpu_offload", False))
    if parallel.sharded:
        dist = dataclasses.replace(dist, lockstep=True)  # every forward is a collective now
        parallel.dist = dist
    lr = tc.lr or default_lr_for(method)  # train.lr, else what the method's options need
    stream, total_steps = training_stream(train_dataset, tc, collator, dist.world_size)
    optimizer = build_optimizer(bare, lr, tc.weight_decay, lr_multipliers_for(method, tc))
    scheduler = build_scheduler(optimizer, tc.schedule, math.ceil(tc.warmup_ratio * total_steps),
                                total_steps)
    progress = Progress()
    set_seed(tc.seed)
    damaged: list[str] = []  # newer checkpoints that did not load (resume uses an older one)
    if resume:
        checkpoint, state, damaged = load_latest_checkpoint(run_dir, bare, optimizer, scheduler)
        progress = Progress(**state["progress"])
        rng = state["rng"]
        restore_rng(rng[dist.rank] if len(rng) == dist.world_size else rng[0])
    elif dist.is_main:
        save_run_config(config, run_dir / "config.yaml")

    trackers = open_trackers(config, run_dir, resume=resume, start_step=progress.step,
                             enabled=dist.is_main)
    log = RunLog(run_dir, total_steps, progress.step, enabled=dist.is_main, trackers=trackers)
    if dist.is_main and (slow_bf16 := bf16_warning(tc.bf16, dist.device)):
        log.message(slow_bf16)
    for problem in damaged:
        log.message(f"skipped a damaged checkpoint ({problem}); resuming from {checkpoint.name}")
    return Run(config=config, tokenizer=tokenizer, dist=dist, run_dir=run_dir, final_dir=final_dir,
                model=bare, parallel=parallel, optimizer=optimizer, scheduler=scheduler,
                trainable=[p for _, p in trainable_parameters(bare)], stream=stream,
                total_steps=total_steps, lr=lr, collator=collator,
                eval_collator=Collator(tokenizer.pad_token_id), train_dataset=train_dataset,
                eval_dataset=eval_dataset, bf16=bf16,
                metric=tc.metric or default_metric(task), log=log, progress=progress,
                started=started)


def _optimizer_step(run: Run) -> None:
    """One optimizer step over `grad_accum` global batches; logs it."""
    tc, task, dist, progress = run.tc, run.config.task, run.dist, run.progress
    tick = time.perf_counter()
    batches = [run.collator([run.train_dataset[i] for i in dist.shard(run.stream.rows(progress.batch + k))])
               for k in range(tc.grad_accum)]
    tokens = sum(batch_tokens(b) for b in batches)
    counts = dist.all_reduce_sum(torch.tensor(
        [sum(count_targets(task, b["labels"]) for b in batches), tokens], dtype=torch.float64))
    targets, tokens = float(counts[0]), int(counts[1])
    autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=run.bf16)
    step_loss = torch.zeros((), dtype=torch.float64)
    for k, batch in enumerate(batches):
        batch = {key: value.to(dist.device) for key, value in batch.items()}
        last = k == len(batches) - 1
        sync = run.parallel.accumulating(last)
        # Backward too: gradient checkpointing re-runs the attention there.
        attention = packed_attention(run.model) if run.collator.packing else contextlib.nullcontext()
        fused = compiled_elementwise(run.model) if tc.compile else contextlib.nullcontext()
        with sync, attention, fused, step_levers(run.model, tc):
            with autocast:
                loss = batch_loss(run.parallel.forward, task, batch, head_owner=run.model,
                                  chunk_rows=tc.loss_chunk_tokens)
            scaled = loss * (dist.world_size / max(targets, 1.0))
            if last and (extra := training_loss_term(run.model)) is not None:
                scaled = scaled + extra  # a method's own term (AdaLoRA), once a step, not logged
            scaled.backward()
        step_loss += loss.detach().double().cpu()
    step_loss = float(dist.all_reduce_sum(step_loss)) / max(targets, 1.0)
    # With max_grad_norm None the norm is still measured (logged, and checked for nan).
    grad_norm = run.parallel.clip_grad_norm(run.trainable, tc.max_grad_norm or math.inf)
    finite = math.isfinite(step_loss) and bool(torch.isfinite(grad_norm))
    lr_now = run.scheduler.get_last_lr()[0]
    if finite:
        run.optimizer.step()
        after_optimizer_step(run.model, progress.step + 1, run.total_steps)  # gradients still there
    elif tc.on_nan == "stop":
        raise DeltatuneError(f"step {progress.step + 1}: the loss is {step_loss} (grad norm "
                             f"{float(grad_norm)}); "
                             "lower train.lr, or set train.on_nan=skip to skip such steps")
    else:
        run.log.message(f"step {progress.step + 1}: non-finite loss, step skipped")
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    progress.step += 1
    progress.batch += tc.grad_accum
    seconds = time.perf_counter() - tick
    progress.train_seconds += seconds
    progress.train_tokens += tokens
    window = run.window
    if finite:
        window.loss, window.steps = window.loss + step_loss, window.steps + 1
    window.tokens, window.seconds = window.tokens + tokens, window.seconds + seconds
    run.log.advance(step_loss if finite else None, tokens / seconds if seconds else None)
    if progress.step % tc.log_every == 0 or progress.step == run.total_steps:
        run.log.log({"step": progress.step, "epoch": round(progress.batch / run.stream.per_epoch, 4),
                     "loss": window.loss / max(window.steps, 1), "lr": lr_now,
                     "grad_norm": float(grad_norm),
                     "tokens_per_s": window.tokens / max(window.seconds, 1e-9),
                     "peak_memory_mb": round(peak_memory()[0] / 2**20, 1),
                     "elapsed_s": round(time.time() - run.started, 2)})
        run.window = Window()


def _evaluate(run: Run, final: bool) -> dict[str, float]:
    """Evaluate, log, and keep `best` up to date."""
    config, progress, metric = run.config, run.progress, run.metric
    with_em = metric == "exact_match" or (final and config.data.format == "gsm8k")
    metrics = evaluate_model(run.model, run.eval_dataset, config.task, run.eval_collator,
                             with_exact_match=with_em,
                             batch_size=run.tc.eval_batch_size or run.tc.batch_size,
                             dist=run.dist, bf16=run.bf16, tokenizer=run.tokenizer)
    run.log.log({"step": progress.step, **{f"eval_{k}": v for k, v in metrics.items()}})
    vocab = getattr(getattr(run.model, "config", None), "vocab_size", None)
    progress.evaluations.append([progress.step, no_information(metrics, vocab)])
    if metric not in metrics:
        raise DeltatuneError(f"train.metric: {metric!r} is not computed for task {config.task!r} "
                             f"(available: {', '.join(k for k in metrics if k not in NOT_SHOWN)})")
    if is_better(metric, metrics[metric], progress.best_metric):
        progress.best_metric, progress.best_step = metrics[metric], progress.step
        progress.evals_since_best = 0
        if run.tc.eval_every:
            from deltatune.adapters_io import save_adapter

            with run.parallel.full_weights():  # every rank gathers; rank 0 writes
                if run.dist.is_main:
                    save_adapter(run.model, run.run_dir / "best")
    else:
        progress.evals_since_best += 1
    run.log.message(f"step {progress.step}: " + ", ".join(
        f"{k} {v:.4f}" for k, v in metrics.items() if k not in NOT_SHOWN))
    return metrics


def _check_early_stopping(run: Run) -> None:
    patience = run.tc.early_stopping_patience
    if patience and run.progress.evals_since_best >= patience:
        run.progress.stopped_early = True
        run.log.message(f"early stopping at step {run.progress.step}: no better {run.metric} in "
                        f"{patience} evaluations")


def _checkpoint(run: Run) -> None:
    """checkpoints/step-N/ with every rank's RNG state (rank 0 writes; the others wait)."""
    dist = run.dist
    run.log.flush()  # the trackers hold every step up to this checkpoint before it exists
    rng = [rng_from_bytes(b) for b in dist.gather(rng_to_bytes(capture_rng()))]
    state = {"progress": asdict(run.progress), "rng": rng}
    if run.parallel.sharded:
        save_sharded_checkpoint(run.run_dir, run.progress.step, run.model, run.optimizer,
                                run.scheduler, state, run.tc.keep_checkpoints, dist)
    elif dist.is_main:
        save_checkpoint(run.run_dir, run.progress.step, run.model, run.optimizer, run.scheduler,
                        state, run.tc.keep_checkpoints)
    dist.barrier()


def _finish(run: Run, final_metrics: dict[str, float]) -> dict:
    """The final delta and summary.json (rank 0), then the run directory renamed into place."""
    bare, dist = run.model, run.dist
    bare.eval()
    in_sync = None if run.parallel.sharded else ranks_in_sync(run.trainable, dist)
    run.parallel.release_optimizer(run.optimizer)
    summary = None
    with run.parallel.full_weights():
        summary = _write_summary(run, final_metrics, in_sync) if dist.is_main else None
    peaks = dist.gather(peak_memory()[0])  # each rank's own peak (rank 0's includes the save)
    if dist.enabled and dist.is_main:
        summary = rewrite_summary(run.run_dir, {**summary, "peak_memory_bytes_by_rank": peaks})
    if dist.is_main:
        run.log.finish(summary, run.run_dir)  # the trackers: summary and delta, then closed
    dist.barrier()
    finish_run_dir(run.run_dir, run.final_dir, dist)
    return dist.broadcast(summary)


def _write_summary(run: Run, final_metrics: dict[str, float], in_sync: bool | None) -> dict:
    bare, dist, progress = run.model, run.dist, run.progress
    trainable_count, total_count = count_parameters(bare)
    train_dataset, eval_dataset = run.train_dataset, run.eval_dataset
    verdict = did_not_learn(progress.evaluations)
    summary = write_summary(run.run_dir, bare, run.tokenizer, run.config, {
        "trainable_params": trainable_count, "total_params": total_count,
        "trainable_percent": round(100 * trainable_count / max(total_count, 1), 4),
        "lr": run.lr, "bf16": run.bf16, "world_size": dist.world_size,
        "steps": progress.step, "total_steps": run.total_steps,
        "epochs": round(progress.batch / run.stream.per_epoch, 4),
        "train_examples": len(train_dataset),
        "truncated_train_rows": getattr(train_dataset, "stats", {}).get("truncated"),
        "eval_examples": len(eval_dataset) if eval_dataset is not None else 0,
        "train_time_s": round(progress.train_seconds, 3),
        "time_per_step_s": round(progress.train_seconds / max(progress.step, 1), 4),
        "tokens_per_s": round(progress.train_tokens / max(progress.train_seconds, 1e-9), 1),
        "final_eval": final_metrics, "metric": run.metric,
        "best": {"metric": run.metric, "value": progress.best_metric, "step": progress.best_step},
        "stopped_early": progress.stopped_early, "ranks_in_sync": in_sync,
        # None when nothing was evaluated; else false with the reason and the advice
        "learned": None if not progress.evaluations else verdict is None,
        "did_not_learn": verdict,
        "distributed": describe(run.parallel),
    }, run.started, dist.device)
    return summary


def train_from_config(config_path: str, overrides: list[str] | tuple[str, ...] = (),
                      resume: bool = False, overwrite: bool = False,
                      on_step: Callable[[int], None] | None = None) -> dict:
    """`deltatune train CONFIG.yaml [key=value ...]`: load, apply the method, train, evaluate,
    save. Under torchrun every rank runs this; rank 0 writes. `on_step`: see `train`."""
    started = time.time()
    config = load_run_config(config_path, list(overrides))  # YAML + overrides -> RunConfig
    method = method_config_for(config)  # `method:` -> LoraConfig, ...: the method's own checks
    check_installed(config.train.report_to)  # a missing tracker fails now, not after loading
    # Fail before loading anything: a live run holding the directory, or the wrong flags.
    with run_dir_lock(Path(config.output_dir), int(os.environ.get("RANK", "0"))):
        check_output_dir(Path(config.output_dir), resume, overwrite)
        return _train_from_config(config, method, resume, overwrite, on_step, started)


def _train_from_config(config: RunConfig, method: MethodConfig, resume: bool, overwrite: bool,
                       on_step: Callable[[int], None] | None, started: float) -> dict:
    from deltatune.data.dataset import build_dataset, num_labels_of
    from deltatune.data.labels import check_label_set
    from deltatune.deltas import apply
    from deltatune.models import load_model

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
        apply(model, method)
        # exact under autocast; this model is ours (speed.py). One process only: sharding (FSDP)
        # wants one dtype per parameter group.
        if config.train.frozen_bf16 and not dist.enabled and resolve_bf16(config.train.bf16, dist.device):
            hold_frozen_weights_in_bf16(model)
        summary = train(model, tokenizer, config, method=method, train_dataset=train_dataset,
                        eval_dataset=eval_dataset, resume=resume, overwrite=overwrite, dist=dist,
                        on_step=on_step, started=started)
        finished = True
    finally:
        teardown_distributed(dist, wait=finished)
    if dist.is_main:
        final = summary.get("final_eval") or {}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k not in NOT_SHOWN)
        print(f"trained {summary['steps']} steps in {summary['wall_time_s']:.1f} s; "
              f"{shown or 'no eval data'}; saved to {config.output_dir}")
    return summary
